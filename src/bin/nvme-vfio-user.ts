#!/usr/bin/env node
// The installed command (package.json "bin"). npm reaches it through links (node_modules/.bin,
// npx, npm link, global installs), so it runs main() unconditionally instead of guessing whether
// it is the main module from paths that a link makes differ.

import { main } from '../cli.js';

await main(process.argv.slice(2));
