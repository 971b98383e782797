// Summarizes a soak log (scripts/soak.sh): every hop's VM downtime and total time, and the verdict.
// Exits 1 when the log shows fewer hops than asked or an unclean round: vitest passes a run whose
// name filter matched no test, and a soak of no hops must not pass.
import { readFileSync } from 'node:fs';

const [logPath, wanted, status] = process.argv.slice(2);
const log = readFileSync(logPath, 'utf8');
const hops = [...log.matchAll(/\] hop (\d+): downtime (\d+) ms, total (\d+) ms/g)].map((m) => ({ downtime: Number(m[2]), total: Number(m[3]) }));
const rounds = /rounds: (.*)$/m.exec(log)?.[1]?.trim().split(/\s+/) ?? [];
const cleanRounds = rounds.filter((r) => r.startsWith('0/0/')).length;
const stats = (xs) => {
  if (xs.length === 0) return 'n/a';
  const s = [...xs].sort((a, b) => a - b);
  const at = (q) => s[Math.min(s.length - 1, Math.floor(q * s.length))];
  return `min ${s[0]}, median ${at(0.5)}, p95 ${at(0.95)}, max ${s[s.length - 1]}`;
};
const tests = /Tests\s+(.*)$/m.exec(log)?.[1]?.trim() ?? 'no vitest summary';
console.log(`# Migration soak (${new Date().toISOString().slice(0, 10)})

- hops asked: ${wanted}; completed: ${hops.length}; vitest exit status ${status} (${tests})
- rounds of verified guest I/O: ${rounds.length}, clean (fio exit 0, 0 verify errors): ${cleanRounds}
- VM downtime (ms): ${stats(hops.map((h) => h.downtime))}
- total time per hop (ms): ${stats(hops.map((h) => h.total))}

Full log: bench/results/soak.log.`);
const missing = [];
if (hops.length !== Number(wanted)) missing.push(`${hops.length} of ${wanted} hops completed`);
if (rounds.length === 0 || cleanRounds !== rounds.length) missing.push(`${cleanRounds} of ${rounds.length} rounds of verified I/O clean`);
if (missing.length > 0) {
  console.log(`\nThe soak FAILED: ${missing.join('; ')}.`);
  process.exit(1);
}
