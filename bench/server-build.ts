// The server the benchmarks measure is the one users install: tsc's output in dist/, run by plain
// node (the package's bin), for `serve` and the CLI verbs alike. Tests run the sources through the
// tsx loader instead, which names every closure with an Object.defineProperty call where it is
// created: a fifth of the server's CPU in a guest's 4k QD32 run (perf), which no user pays.

import { spawnSync } from 'node:child_process';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { setDefaultCommand } from '../test/support/server-process.js';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

/** Compiles a checkout the way the package ships it (tsc into dist/, the .proto files beside). */
export function buildServer(root: string = REPO): void {
  const tsc = path.join(REPO, 'node_modules', 'typescript', 'bin', 'tsc');
  for (const args of [[tsc, '-p', path.join(root, 'tsconfig.json')], [path.join(root, 'scripts', 'copy-proto.mjs')]]) {
    const r = spawnSync(process.execPath, args, { cwd: root, encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`building the server in ${root} failed: ${r.stdout}${r.stderr}`);
  }
}

/** `nvme-vfio-user` as installed from `root` (after buildServer), with node flags before the script. */
export const builtServerCommand = (root: string = REPO, nodeFlags: readonly string[] = []): string[] =>
  [process.execPath, ...nodeFlags, path.join(root, 'dist', 'src', 'bin', 'nvme-vfio-user.js')];

/** Builds this checkout and makes every server and CLI run of this process the built one. */
export function useBuiltServer(): void {
  buildServer();
  setDefaultCommand(builtServerCommand());
}
