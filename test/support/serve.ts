// Runs `nvme-vfio-user serve ARGS` from this checkout's sources and waits until it prints `ready`
// on stdout (e.g. `control on PATH`): for servers that export nothing at start.

import { spawnServe, type Served } from './server-process.js';

export type { Served };

/** `netns`: run inside that network namespace (ip netns exec), as a server on another host would. */
export function startServe(args: string[], ready: string, timeoutMs = 15_000, netns?: string): Promise<Served> {
  return spawnServe(args, ready, { timeoutMs, ...(netns ? { netns } : {}) });
}
