// The Node SDK (memphis-dev, unmodified) and the gateway's schemas and dead letters: on a station with a JSON
// schema (made over the gateway's REST API), produce a message the schema refuses (the SDK's validation
// refuses it and, with dls.schemaverse on, reports it to the dead-letter store) and a good one; then a
// consumer group with maxMsgDeliveries 2 fetches the good one without ever acknowledging it, until the
// broker gives up on it (a poison message). Prints one JSON line with what happened.
// argv: host port token station
const { memphis } = require('memphis-dev');

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function main() {
  const [host, port, token, station] = process.argv.slice(2);
  const conn = await memphis.connect({
    host, port: Number(port), username: 'root', connectionToken: token, reconnect: false, timeoutMs: 5000,
    suppressLogs: true,
  });
  const producer = await conn.producer({ stationName: station, producerName: 'node-producer', timeoutRetry: 0 });
  let refused = '';
  try {
    await producer.produce({ message: Buffer.from('{"b": 1}') });
  } catch (err) {
    refused = String(err && err.message || err);
  }
  await producer.produce({ message: Buffer.from('{"a": 1}') });
  const consumer = await conn.consumer({
    stationName: station, consumerName: 'node', consumerGroup: 'node-poison', batchMaxTimeToWaitMs: 1000,
    maxAckTimeMs: 1000, maxMsgDeliveries: 2, timeoutRetry: 0,
  });
  const fetched = [];
  for (let i = 0; i < 3; i += 1) { // never acknowledged: delivered twice, then given up
    const msgs = await consumer.fetch({ batchSize: 10 });
    fetched.push(msgs.map((m) => m.getData().toString()));
    await sleep(1500);
  }
  process.stdout.write(JSON.stringify({ refused, fetched }) + '\n');
  await conn.close();
}

main().then(() => process.exit(0), (err) => {
  process.stdout.write(JSON.stringify({ error: String(err && err.message || err) }) + '\n');
  process.exit(1);
});
