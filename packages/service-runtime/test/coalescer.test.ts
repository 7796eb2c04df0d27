/**
 * Coalescer (src/coalescer.ts): calls made together share a batch, calls made while the batches
 * are full go together in the next, and the limits (items, size, batches in flight, one call
 * per key) hold. The run function here records each batch and answers when the test says.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Coalescer } from '../src/coalescer.ts';

interface Item {
  id: number;
  key?: string;
  size?: number;
}

/** A coalescer whose batches the test finishes by hand; each batch's items, in order, and the most ever running at once. */
function recorder(options: { itemsMax?: number; inFlightMax?: number; sizeMax?: number; keyed?: boolean } = {}) {
  const batches: number[][] = [];
  const finish: Array<(fail?: Error) => void> = [];
  let running = 0;
  let mostRunning = 0;
  const coalescer = new Coalescer<Item, string>({
    itemsMax: options.itemsMax ?? 100,
    inFlightMax: options.inFlightMax ?? 1,
    ...(options.keyed === true ? { keyOf: (item: Item) => item.key ?? String(item.id) } : {}),
    ...(options.sizeMax === undefined ? {} : { sizeOf: (item: Item) => item.size ?? 1, sizeMax: options.sizeMax }),
    run: (items) => {
      batches.push(items.map((i) => i.id));
      running += 1;
      mostRunning = Math.max(mostRunning, running);
      return new Promise<string[]>((resolve, reject) => {
        finish.push((fail) => {
          running -= 1;
          if (fail === undefined) resolve(items.map((i) => `done ${i.id}`));
          else reject(fail);
        });
      });
    },
  });
  return { coalescer, batches, finish, mostRunning: () => mostRunning };
}

/** Two turns of the event loop: a finished batch's continuation, then the next batch's start. */
const turn = async (): Promise<void> => {
  for (let i = 0; i < 2; i++) await new Promise((resolve) => setImmediate(resolve));
};

test('calls made in one turn share a batch; calls made while it runs go together in the next', async () => {
  const r = recorder();
  const first = [1, 2, 3].map((id) => r.coalescer.submit({ id }));
  await turn();
  assert.deepEqual(r.batches, [[1, 2, 3]]);
  const second = [4, 5].map((id) => r.coalescer.submit({ id }));
  await turn();
  assert.deepEqual(r.batches, [[1, 2, 3]], 'no second batch while the first runs (inFlightMax 1)');
  r.finish.shift()?.();
  assert.deepEqual(await Promise.all(first), ['done 1', 'done 2', 'done 3']);
  await turn();
  assert.deepEqual(r.batches, [[1, 2, 3], [4, 5]]);
  r.finish.shift()?.();
  assert.deepEqual(await Promise.all(second), ['done 4', 'done 5']);
  assert.deepEqual(r.coalescer.stats, { batches: 2, items: 5 });
});

test('a lone call runs alone, at the next turn', async () => {
  const r = recorder();
  const one = r.coalescer.submit({ id: 7 });
  assert.deepEqual(r.batches, [], 'not started synchronously');
  await turn();
  assert.deepEqual(r.batches, [[7]]);
  r.finish.shift()?.();
  assert.equal(await one, 'done 7');
});

test('itemsMax splits a burst, and inFlightMax bounds the batches running at once', async () => {
  const r = recorder({ itemsMax: 2, inFlightMax: 2 });
  const all = [1, 2, 3, 4, 5].map((id) => r.coalescer.submit({ id }));
  await turn();
  assert.deepEqual(r.batches, [[1, 2], [3, 4]]);
  r.finish.shift()?.();
  await turn();
  assert.deepEqual(r.batches, [[1, 2], [3, 4], [5]]);
  while (r.finish.length > 0) r.finish.shift()?.();
  assert.equal((await Promise.all(all)).length, 5);
  assert.equal(r.mostRunning(), 2);
});

test('sizeMax closes a batch, but a batch always takes its first item, however large', async () => {
  const r = recorder({ sizeMax: 10 });
  const all = [
    r.coalescer.submit({ id: 1, size: 25 }),
    r.coalescer.submit({ id: 2, size: 4 }),
    r.coalescer.submit({ id: 3, size: 4 }),
    r.coalescer.submit({ id: 4, size: 4 }),
  ];
  for (let i = 0; i < 3; i++) {
    await turn();
    r.finish.shift()?.();
    await turn();
  }
  await Promise.all(all);
  assert.deepEqual(r.batches, [[1], [2, 3], [4]]);
});

test('two calls with one key never share a batch, and keep their order', async () => {
  const r = recorder({ keyed: true });
  const all = [
    r.coalescer.submit({ id: 1, key: 'a' }),
    r.coalescer.submit({ id: 2, key: 'b' }),
    r.coalescer.submit({ id: 3, key: 'a' }),
    r.coalescer.submit({ id: 4, key: 'c' }),
    r.coalescer.submit({ id: 5, key: 'a' }),
  ];
  for (let i = 0; i < 3; i++) {
    await turn();
    r.finish.shift()?.();
    await turn();
  }
  await Promise.all(all);
  assert.deepEqual(r.batches, [[1, 2, 4], [3], [5]]);
});

test('a failed batch fails each of its calls and only those; the next batch still runs', async () => {
  const r = recorder();
  const failed = [1, 2].map((id) => r.coalescer.submit({ id }));
  await turn();
  const later = r.coalescer.submit({ id: 3 });
  r.finish.shift()?.(new Error('connection lost'));
  for (const call of failed) await assert.rejects(call, /connection lost/);
  await turn();
  r.finish.shift()?.();
  assert.equal(await later, 'done 3');
});

test('a run that answers the wrong number of results fails its calls; bad limits are refused', async () => {
  const c = new Coalescer<number, number>({ itemsMax: 10, inFlightMax: 1, run: (items) => Promise.resolve(items.slice(1)) });
  await assert.rejects(Promise.all([c.submit(1), c.submit(2)]), /a batch of 2 items returned 1 results/);
  assert.throws(() => new Coalescer<number, number>({ itemsMax: 0, inFlightMax: 1, run: () => Promise.resolve([]) }), /itemsMax/);
  assert.throws(() => new Coalescer<number, number>({ itemsMax: 1, inFlightMax: 1.5, run: () => Promise.resolve([]) }), /inFlightMax/);
});
