// Loads a .proto file that sits beside the module using it (the build copies .proto files into
// dist/ next to the compiled modules), once, and looks message types up in it.

import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import protobuf from 'protobufjs';

const roots = new Map<string, protobuf.Root>();

/** Message types of `file`, resolved relative to `moduleUrl` (pass import.meta.url). */
export function protoTypes<const Names extends readonly string[]>(moduleUrl: string, file: string, names: Names): { [K in Names[number]]: protobuf.Type } {
  const path = fileURLToPath(new URL(file, moduleUrl));
  let root = roots.get(path);
  if (!root) {
    if (!existsSync(path)) throw new Error(`protocol definition missing: ${path}`);
    root = protobuf.loadSync(path);
    roots.set(path, root);
  }
  return Object.fromEntries(names.map((name) => [name, root!.lookupType(name)])) as { [K in Names[number]]: protobuf.Type };
}

/** How decoded messages become plain objects: 64-bit integers as numbers, arrays always present. */
export const PLAIN: protobuf.IConversionOptions = { longs: Number, arrays: true };
