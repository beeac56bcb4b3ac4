#!/usr/bin/env node
// Times ton-local over HTTP the way the settler uses it: settlements of 255 transfers (sendBocReturnHash), each
// followed by a look at the wallet's newest 2 and newest 32 transactions (getTransactions), and prints the
// means per 20 settlements with the server's resident memory.
//
// Usage: node infra/ton-local/bench/http.mjs [settlements, default 60] [server.mjs to run, default ours]
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { Address, beginCell, external, internal, storeMessage } from '@ton/core';
import { SendMode, WalletContractV5R1 } from '@ton/ton';
import { keyPairFromSeed } from '@ton/crypto';

const rounds = Number(process.argv[2] ?? 60);
const server = process.argv[3] ?? fileURLToPath(new URL('../server.mjs', import.meta.url));
const rssMiB = (pid) => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))[1]) / 1024;

const kp = keyPairFromSeed(Buffer.alloc(32, 9));
const wallet = WalletContractV5R1.create({ workchain: 0, publicKey: kp.publicKey });
const proc = spawn(process.execPath, [server, '--public-key', kp.publicKey.toString('hex'), '--port', '0', '--exit-with-stdin'], {
    stdio: ['pipe', 'pipe', 'ignore'],
});
const ready = await new Promise((resolve, reject) => {
    let out = '';
    proc.stdout.on('data', (d) => {
        out += d;
        const nl = out.indexOf('\n');
        if (nl >= 0) resolve(JSON.parse(out.slice(0, nl)));
    });
    proc.on('exit', (code) => reject(new Error(`server exited with ${code}`)));
});

async function call(path, method, query, body) {
    const url = new URL(path, ready.url);
    for (const [k, v] of Object.entries(query ?? {})) url.searchParams.set(k, v);
    const res = await fetch(url, { method, headers: { 'content-type': 'application/json' }, body: body && JSON.stringify(body) });
    const json = await res.json();
    if (!json.ok) throw new Error(`${path}: ${JSON.stringify(json)}`);
    return json.result;
}

const timed = async (f) => {
    const t = performance.now();
    await f();
    return performance.now() - t;
};

console.log(`${rounds} settlements of 255 transfers against ${server}`);
let sum = { send: 0, get2: 0, get32: 0 };
for (let round = 0; round < rounds; round++) {
    const messages = [];
    for (let i = 0; i < 255; i++) {
        const hash = Buffer.alloc(32);
        hash.writeUInt32BE((round * 255 + i) % 10000, 0); // 10,000 payees, as in the load test
        messages.push(internal({ to: new Address(0, hash), value: 1000n, bounce: false }));
    }
    const body = wallet.createTransfer({
        seqno: round,
        secretKey: kp.secretKey,
        messages,
        sendMode: SendMode.PAY_GAS_SEPARATELY | SendMode.IGNORE_ERRORS,
        timeout: Math.floor(Date.now() / 1000) + 600,
    });
    const boc = beginCell().store(storeMessage(external({ to: wallet.address, body }))).endCell().toBoc().toString('base64');
    sum.send += await timed(() => call('/api/v2/sendBocReturnHash', 'POST', null, { boc }));
    sum.get2 += await timed(() => call('/api/v2/getTransactions', 'GET', { address: ready.wallet, limit: '2' }));
    sum.get32 += await timed(() => call('/api/v2/getTransactions', 'GET', { address: ready.wallet, limit: '32' }));
    if (round % 20 === 19) {
        const n = 20;
        console.log(
            `settlements ${round + 1}: send ${(sum.send / n).toFixed(0)} ms, newest 2 ${(sum.get2 / n).toFixed(1)} ms, ` +
                `newest 32 ${(sum.get32 / n).toFixed(1)} ms, server RSS ${rssMiB(proc.pid).toFixed(0)} MiB`,
        );
        sum = { send: 0, get2: 0, get32: 0 };
    }
}
proc.stdin.end();
