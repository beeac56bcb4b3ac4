// Self-test of server.mjs: starts it as a child process and pays out through
// the real wallet v5r1 contract, as the settler does. Run with `npm test`.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { Address, Cell, beginCell, external, internal, storeMessage, toNano } from '@ton/core';
import { SendMode, WalletContractV5R1 } from '@ton/ton';
import { keyPairFromSeed } from '@ton/crypto';

const SERVER = fileURLToPath(new URL('../server.mjs', import.meta.url));
const BALANCE = toNano(1000);

let child;
let stderr = '';
let ready;
let keyPair;
let wallet;

function startServer(args) {
    const proc = spawn(process.execPath, [SERVER, ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    proc.stderr.on('data', (d) => {
        err += d;
        stderr += d;
    });
    const line = new Promise((resolve, reject) => {
        proc.stdout.on('data', (d) => {
            out += d;
            const nl = out.indexOf('\n');
            if (nl >= 0) resolve(JSON.parse(out.slice(0, nl)));
        });
        proc.on('exit', (code) => reject(new Error(`server exited with ${code} before it was ready:\n${err}`)));
    });
    return { proc, line, exit: new Promise((resolve) => proc.on('exit', (code) => resolve({ code, err }))) };
}

async function call(path, { method = 'GET', query, body, headers } = {}) {
    const url = new URL(path, ready.url);
    for (const [k, v] of Object.entries(query ?? {})) url.searchParams.set(k, v);
    const res = await fetch(url, {
        method,
        headers: { 'content-type': 'application/json', ...headers },
        body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
    });
    const json = await res.json();
    return { status: res.status, json };
}

async function ok(path, opts) {
    const { status, json } = await call(path, opts);
    assert.equal(status, 200, `${path}: ${JSON.stringify(json)}`);
    assert.equal(json.ok, true);
    return json.result;
}

const balance = async (address) => BigInt(await ok('/api/v2/getAddressBalance', { query: { address } }));

async function seqno() {
    const r = await ok('/api/v2/runGetMethod', { method: 'POST', body: { address: ready.wallet, method: 'seqno', stack: [] } });
    assert.equal(r.exit_code, 0);
    assert.equal(r.stack[0][0], 'num');
    return Number(BigInt(r.stack[0][1]));
}

function transferBoc(seq, payouts) {
    const body = wallet.createTransfer({
        seqno: seq,
        secretKey: keyPair.secretKey,
        messages: payouts.map(({ to, value }) => internal({ to, value, bounce: false })),
        sendMode: SendMode.PAY_GAS_SEPARATELY | SendMode.IGNORE_ERRORS,
    });
    const cell = beginCell().store(storeMessage(external({ to: wallet.address, body }))).endCell();
    return cell.toBoc().toString('base64');
}

before(async () => {
    keyPair = keyPairFromSeed(randomBytes(32));
    wallet = WalletContractV5R1.create({ workchain: 0, publicKey: keyPair.publicKey });
    const server = startServer(['--public-key', keyPair.publicKey.toString('hex'), '--port', '0', '--exit-with-stdin']);
    child = server.proc;
    ready = await server.line;
});

after(() => {
    child?.stdin.end();
});

test('ready line describes the deployed wallet', async () => {
    assert.match(ready.url, /^http:\/\/127\.0\.0\.1:\d+$/);
    assert.equal(ready.wallet, wallet.address.toString({ urlSafe: true, bounceable: true }));
    assert.equal(ready.wallet_raw, wallet.address.toRawString());
    assert.equal(ready.balance, BALANCE.toString());
    assert.equal(await balance(ready.wallet), BALANCE);
    const info = await ok('/api/v2/getAddressInformation', { query: { address: ready.wallet_raw } });
    assert.equal(info.state, 'active');
    assert.equal(await seqno(), 0);
    assert.deepEqual(await ok('/dev/health'), { status: 'ok', wallet: ready.wallet, externals: 'execute' });
});

test('a two-payout v5r1 transfer executes, and its transactions are visible', async () => {
    const a = new Address(0, randomBytes(32));
    const b = new Address(0, randomBytes(32));
    const amounts = [toNano('1.5'), toNano('2.25')];
    const before = await balance(ready.wallet);
    const boc = transferBoc(0, [
        { to: a, value: amounts[0] },
        { to: b, value: amounts[1] },
    ]);
    const sent = await ok('/api/v2/sendBocReturnHash', { method: 'POST', body: { boc } });
    assert.equal(sent['@type'], 'raw.extMessageInfo');
    assert.equal(sent.hash, Cell.fromBase64(boc).hash().toString('base64'));

    assert.equal(await balance(a.toString()), amounts[0]);
    assert.equal(await balance(b.toRawString()), amounts[1]);
    assert.equal(await seqno(), 1);
    const after = await balance(ready.wallet);
    const fee = before - after - amounts[0] - amounts[1];
    assert.ok(fee > 0n && fee < toNano('0.1'), `fee ${fee}`);
    process.stderr.write(`# 2-payout transfer: wallet paid ${fee} nanoton in fees\n`);

    const txs = await ok('/api/v2/getTransactions', { query: { address: ready.wallet, limit: '10' } });
    assert.equal(txs.length, 2); // the deployment and the transfer
    const tx = txs[0];
    assert.equal(tx.in_msg.hash, sent.hash);
    assert.equal(tx.in_msg.source, '');
    assert.equal(tx.in_msg.value, '0');
    assert.equal(tx.description.aborted, false);
    assert.equal(tx.description.compute_exit_code, 0);
    assert.equal(tx.description.action_result_code, 0);
    assert.equal(tx.description.total_actions, 2);
    assert.equal(BigInt(tx.fee), BigInt(tx.storage_fee) + BigInt(tx.other_fee));
    assert.equal(tx.out_msgs.length, 2);
    const outs = tx.out_msgs.map((m) => [m.destination, m.value]).sort();
    const want = [
        [a.toString({ urlSafe: true, bounceable: false }), amounts[0].toString()],
        [b.toString({ urlSafe: true, bounceable: false }), amounts[1].toString()],
    ].sort();
    assert.deepEqual(outs, want);
    for (const m of tx.out_msgs) assert.equal(m.source, ready.wallet);
    // What the wallet pays beyond the amounts: the transaction's fee plus the
    // forwarding fees of its messages (which are not part of total_fees).
    const fwdFees = tx.out_msgs.reduce((sum, m) => sum + BigInt(m.fwd_fee), 0n);
    assert.equal(fee, BigInt(tx.fee) + fwdFees, `fee ${tx.fee} + fwd ${fwdFees}`);
    process.stderr.write(`#   transaction fee ${tx.fee} (storage ${tx.storage_fee}) + forwarding fees ${fwdFees}\n`);
    assert.ok(BigInt(txs[0].transaction_id.lt) > BigInt(txs[1].transaction_id.lt));

    // The recipients' own transactions are recorded too.
    const recv = await ok('/api/v2/getTransactions', { query: { address: a.toString() } });
    assert.equal(recv.length, 1);
    assert.equal(recv[0].in_msg.value, amounts[0].toString());
    assert.ok(tx.out_msgs.some((m) => m.hash === recv[0].in_msg.hash));

    // Paging: start at the older transaction (inclusive), and to_lt (exclusive).
    const older = await ok('/api/v2/getTransactions', {
        method: 'POST',
        body: { address: ready.wallet, lt: txs[1].transaction_id.lt, hash: txs[1].transaction_id.hash },
    });
    assert.deepEqual(
        older.map((t) => t.transaction_id.lt),
        [txs[1].transaction_id.lt],
    );
    const newer = await ok('/api/v2/getTransactions', { query: { address: ready.wallet, to_lt: txs[1].transaction_id.lt } });
    assert.deepEqual(
        newer.map((t) => t.transaction_id.lt),
        [txs[0].transaction_id.lt],
    );
    const limited = await ok('/api/v2/getTransactions', { query: { address: ready.wallet, limit: '1' } });
    assert.equal(limited.length, 1);

    // Resending the same message: the contract refuses it (seqno used).
    const again = await call('/api/v2/sendBocReturnHash', { method: 'POST', body: { boc } });
    assert.equal(again.status, 500);
    assert.equal(again.json.ok, false);
    assert.equal(again.json.code, 500);
    assert.match(again.json.error, /^LITE_SERVER_UNKNOWN: cannot apply external message to current state : /);
    assert.equal(await seqno(), 1);
});

test('drop mode answers with the hash but executes nothing', async () => {
    await ok('/dev/externals', { method: 'POST', body: { mode: 'drop' } });
    try {
        const boc = transferBoc(1, [{ to: new Address(0, randomBytes(32)), value: toNano(1) }]);
        const sent = await ok('/api/v2/sendBocReturnHash', { method: 'POST', body: { boc } });
        assert.equal(sent.hash, Cell.fromBase64(boc).hash().toString('base64'));
        assert.equal(await seqno(), 1);
    } finally {
        await ok('/dev/externals', { method: 'POST', body: { mode: 'execute' } });
    }
});

test('dev fund and set-balance', async () => {
    const fresh = new Address(0, randomBytes(32)).toString();
    assert.equal(await balance(fresh), 0n);
    const info = await ok('/api/v2/getAddressInformation', { query: { address: fresh } });
    assert.equal(info.state, 'uninitialized');
    const gm = await ok('/api/v2/runGetMethod', { method: 'POST', body: { address: fresh, method: 'seqno', stack: [] } });
    assert.notEqual(gm.exit_code, 0);

    const funded = await ok('/dev/fund', { method: 'POST', body: { address: fresh, amount: '5000000000' } });
    assert.deepEqual(funded, { balance: '5000000000' });
    assert.equal(await balance(fresh), 5_000_000_000n);

    await ok('/dev/set-balance', { method: 'POST', body: { address: ready.wallet, amount: '123' } });
    assert.equal(await balance(ready.wallet), 123n);
    await ok('/dev/set-balance', { method: 'POST', body: { address: ready.wallet, amount: BALANCE.toString() } });
    assert.equal(await balance(ready.wallet), BALANCE);
});

test('bad input gives 400, never a crash', async () => {
    const internalMsg = beginCell()
        .store(storeMessage(internal({ to: wallet.address, value: 1n, bounce: false })))
        .endCell()
        .toBoc()
        .toString('base64');
    const cases = [
        ['/api/v2/sendBocReturnHash', { method: 'POST', body: '{not json' }],
        ['/api/v2/sendBocReturnHash', { method: 'POST', body: {} }],
        ['/api/v2/sendBocReturnHash', { method: 'POST', body: { boc: '!!!' } }],
        ['/api/v2/sendBocReturnHash', { method: 'POST', body: { boc: 'aGVsbG8=' } }],
        ['/api/v2/sendBocReturnHash', { method: 'POST', body: { boc: internalMsg } }],
        ['/api/v2/getTransactions', { query: { address: 'nope' } }],
        ['/api/v2/getTransactions', { query: { address: ready.wallet, limit: '101' } }],
        ['/api/v2/getTransactions', { query: { address: ready.wallet, lt: '1' } }],
        ['/api/v2/getAddressBalance', {}],
        ['/api/v2/runGetMethod', { method: 'POST', body: { address: ready.wallet, method: 'seqno', stack: [['num', 'x']] } }],
        ['/dev/fund', { method: 'POST', body: { address: ready.wallet, amount: '-1' } }],
        ['/dev/set-balance', { method: 'POST', body: { address: ready.wallet, amount: 1.5 } }],
        ['/dev/externals', { method: 'POST', body: { mode: 'sometimes' } }],
    ];
    for (const [path, opts] of cases) {
        const { status, json } = await call(path, opts);
        assert.equal(status, 400, `${path} ${JSON.stringify(opts)}: ${JSON.stringify(json)}`);
        assert.equal(json.ok, false);
        assert.equal(json.code, 400);
        assert.ok(json.error.length > 0);
    }
    assert.equal((await call('/nope')).status, 404);
    assert.equal((await call('/api/v2/sendBocReturnHash')).status, 405);
    assert.equal(child.exitCode, null, `server died:\n${stderr}`);
});

test('--api-key is required when set; bad arguments exit 2', async () => {
    const kp = keyPairFromSeed(randomBytes(32));
    const other = startServer(['--public-key', kp.publicKey.toString('hex'), '--api-key', 'sekrit', '--exit-with-stdin']);
    try {
        const r = await other.line;
        const plain = await fetch(`${r.url}/dev/health`);
        assert.equal(plain.status, 401);
        const header = await fetch(`${r.url}/dev/health`, { headers: { 'X-API-Key': 'sekrit' } });
        assert.equal(header.status, 200);
        const query = await fetch(`${r.url}/api/v2/getAddressBalance?api_key=sekrit&address=${r.wallet}`);
        assert.equal(query.status, 200);
    } finally {
        other.proc.stdin.end();
    }
    const { code } = await other.exit;
    assert.equal(code, 0);

    const badArgs = [[], ['--public-key', 'abc'], ['--public-key', '00'.repeat(32), '--port', 'x'], ['--bogus']];
    await Promise.all(
        badArgs.map(async (args) => {
            const bad = startServer(args);
            bad.line.catch(() => {});
            const { code: c, err } = await bad.exit;
            assert.equal(c, 2, `${args.join(' ')}: ${err}`);
            assert.match(err, /ton-local: .+\nusage:/);
        }),
    );
});
