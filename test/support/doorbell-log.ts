// What a `serve --doorbells mapped` log says about each client that left (src/nvme/doorbell-page.ts,
// clientLeft): how many doorbells it stored to the mapped page and how many it wrote by message.

export interface ClientDoorbells {
  fromPage: number;
  byMessage: number;
}

export function mappedDoorbellCounts(log: string): ClientDoorbells[] {
  return [...log.matchAll(/doorbells from this client: (\d+) from the mapped page, (\d+) by message/g)].map((m) => ({ fromPage: Number(m[1]), byMessage: Number(m[2]) }));
}
