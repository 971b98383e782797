// The .proto files that src/protobuf.ts loads at run time sit beside the modules using them: tsc
// compiles only TypeScript, so the build copies them to the same places under dist/.
import { cpSync, readdirSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
for (const entry of readdirSync(join(root, 'src'), { recursive: true, withFileTypes: true })) {
  if (!entry.isFile() || !entry.name.endsWith('.proto')) continue;
  const source = join(entry.parentPath ?? entry.path, entry.name);
  cpSync(source, join(root, 'dist', relative(root, source)));
}
