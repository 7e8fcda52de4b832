// The Node SDK (memphis-dev, unmodified) against the gateway's embedded broker in connection-token mode:
// connect with connectionToken, produce one message (with a header) to a station, then consume what is
// there (the gateway's own message) and print one JSON line with what it saw.
// argv: host port token station
const { memphis } = require('memphis-dev');

async function main() {
  const [host, port, token, station] = process.argv.slice(2);
  const conn = await memphis.connect({
    host, port: Number(port), username: 'root', connectionToken: token, reconnect: false, timeoutMs: 5000,
    suppressLogs: true,
  });
  const producer = await conn.producer({ stationName: station, producerName: 'node-producer', timeoutRetry: 0 });
  const headers = memphis.headers();
  headers.add('X-Origin', 'node');
  await producer.produce({ message: Buffer.from('from-node'), headers });
  const consumer = await conn.consumer({
    stationName: station, consumerName: 'node', consumerGroup: 'node-group', batchMaxTimeToWaitMs: 1000,
    timeoutRetry: 0,
  });
  const msgs = await consumer.fetch({ batchSize: 10 });
  const seen = msgs.map((m) => ({ data: m.getData().toString(), headers: m.getHeaders() }));
  for (const m of msgs) m.ack();
  process.stdout.write(JSON.stringify({ seen }) + '\n');
  await conn.close();
}

main().then(() => process.exit(0), (err) => {
  process.stdout.write(JSON.stringify({ error: String(err && err.message || err) }) + '\n');
  process.exit(1);
});
