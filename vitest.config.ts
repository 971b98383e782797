import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    // Real sockets, real QEMU: each file gets its own process, and slow e2e files set their own timeouts.
    pool: 'forks',
    testTimeout: 30_000,
    hookTimeout: 60_000,
  },
});
