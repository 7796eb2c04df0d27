/** Rate-limit keys of client addresses: IPv4 as it is, IPv6 by its /64, mapped IPv4 as IPv4. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { addressKey } from '../src/index.ts';

test('the key of a client address', () => {
  assert.equal(addressKey('127.0.0.1'), 'ip:127.0.0.1');
  assert.equal(addressKey('::ffff:192.0.2.7'), 'ip:192.0.2.7', 'a dual-stack listener reports IPv4 clients mapped');
  // Every spelling of one /64 gives one key.
  for (const a of ['2001:db8:1:2::1', '2001:db8:1:2::ffff', '2001:0db8:0001:0002:aaaa:bbbb:cccc:dddd', '2001:DB8:1:2:0:0:0:1', '2001:db8:1:2::1%eth0']) {
    assert.equal(addressKey(a), 'ip6:2001:db8:1:2::/64', a);
  }
  assert.equal(addressKey('2001:db8:1:3::1'), 'ip6:2001:db8:1:3::/64', 'the next /64 is another client');
  assert.equal(addressKey('2001:db8::1'), 'ip6:2001:db8:0:0::/64', 'a :: inside the first four groups');
  assert.equal(addressKey('::1'), 'ip6:0:0:0:0::/64');
  assert.equal(addressKey('64:ff9b::192.0.2.1'), 'ip6:64:ff9b:0:0::/64', 'an embedded IPv4 tail counts as two groups');
  assert.equal(addressKey('fe80:1:2:3:4:5:6:7'), 'ip6:fe80:1:2:3::/64');
  // Not an address (a test's inject, a unix socket): used as it is, never merged with another.
  assert.equal(addressKey('unknown'), 'ip:unknown');
});
