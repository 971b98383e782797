import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    // The sources' tests only: build/ may hold compiled copies of them (bench/command-path.ts).
    include: ['test/**/*.test.ts'],
    // Real sockets, real QEMU: each file gets its own process, and slow e2e files set their own timeouts.
    pool: 'forks',
    testTimeout: 30_000,
    hookTimeout: 60_000,
  },
});
