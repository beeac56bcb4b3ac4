#!/usr/bin/env node
// ton-local: a local, toncenter-v2-compatible HTTP API over the real TVM
// (@ton/sandbox), with one wallet v5r1 deployed and funded. Development and
// tests only: it is a single in-memory emulated chain, not a network.
//
// Usage: node server.mjs --public-key <64 hex> [--host 127.0.0.1] [--port 0]
//          [--balance <nanoton>] [--undeployed] [--api-key K] [--exit-with-stdin]
//
// When ready it prints exactly one JSON line to stdout
//   {"url":..,"wallet":..,"wallet_raw":..,"balance":..}
// and logs everything else to stderr. See README.md for the endpoints.

import http from 'node:http';
import { Blockchain } from '@ton/sandbox';
import { WalletContractV5R1 } from '@ton/ton';
import { Address, Cell, Dictionary, beginCell, loadMessage, loadTransaction, storeStateInit } from '@ton/core';

// Everything except the ready line goes to stderr: the sandbox and its
// dependencies log with console.log, and stdout is the machine interface.
console.log = console.error;
console.info = console.error;
console.debug = console.error;

const USAGE = `usage: node server.mjs --public-key <64 hex chars> [--host 127.0.0.1] [--port 0]
                      [--balance <nanoton, default 1000 TON>] [--undeployed] [--api-key K] [--exit-with-stdin]
  --undeployed: the wallet is funded but not deployed (uninitialized): its first message must deploy it`;
const DEFAULT_BALANCE = 1_000_000_000_000n; // 1000 TON
const TREASURY_RESERVE = 1_000_000_000_000_000n; // 1M TON
const MAX_BODY_BYTES = 16 * 1024 * 1024;
const NOT_ACTIVE_EXIT_CODE = -13; // what toncenter answers for a get method on a non-active account

function log(...args) {
    console.error(`[ton-local ${new Date().toISOString()}]`, ...args);
}

// ---------------------------------------------------------------- arguments

function usageError(message) {
    process.stderr.write(`ton-local: ${message}\n${USAGE}\n`);
    process.exit(2);
}

function parseArgs(argv) {
    const opts = {
        publicKey: undefined,
        host: '127.0.0.1',
        port: 0,
        balance: DEFAULT_BALANCE,
        apiKey: undefined,
        exitWithStdin: false,
        undeployed: false,
    };
    for (let i = 0; i < argv.length; i++) {
        const arg = argv[i];
        const value = () => {
            const v = argv[++i];
            if (v === undefined) usageError(`${arg} needs a value`);
            return v;
        };
        switch (arg) {
            case '--public-key': {
                const v = value();
                if (!/^[0-9a-fA-F]{64}$/.test(v)) {
                    usageError(`--public-key must be 64 hex characters (an ed25519 public key), got ${JSON.stringify(v)}`);
                }
                opts.publicKey = Buffer.from(v, 'hex');
                break;
            }
            case '--host':
                opts.host = value();
                break;
            case '--port': {
                const v = value();
                const port = /^\d{1,5}$/.test(v) ? Number(v) : NaN;
                if (!(port >= 0 && port <= 65535)) usageError(`--port must be 0..65535, got ${JSON.stringify(v)}`);
                opts.port = port;
                break;
            }
            case '--balance': {
                const v = value();
                if (!/^\d+$/.test(v)) usageError(`--balance must be a non-negative integer in nanoton, got ${JSON.stringify(v)}`);
                opts.balance = BigInt(v);
                break;
            }
            case '--api-key': {
                const v = value();
                if (v === '') usageError('--api-key must not be empty');
                opts.apiKey = v;
                break;
            }
            case '--exit-with-stdin':
                opts.exitWithStdin = true;
                break;
            case '--undeployed':
                opts.undeployed = true;
                break;
            case '-h':
            case '--help':
                process.stdout.write(`${USAGE}\n`);
                process.exit(0);
                break;
            default:
                usageError(`unknown argument ${JSON.stringify(arg)}`);
        }
    }
    if (opts.publicKey === undefined) usageError('--public-key is required');
    return opts;
}

// ------------------------------------------------------------------- errors

class HttpError extends Error {
    constructor(status, message) {
        super(message);
        this.status = status;
    }
}
const badRequest = (message) => new HttpError(400, message);

// ------------------------------------------------------------ param parsing

function requireString(params, name) {
    const v = params[name];
    if (v === undefined || v === null || v === '') throw badRequest(`missing parameter: ${name}`);
    if (typeof v !== 'string') throw badRequest(`parameter ${name} must be a string`);
    return v;
}

function parseAddress(params, name = 'address') {
    const v = requireString(params, name);
    try {
        return Address.parse(v);
    } catch (e) {
        throw badRequest(`invalid address in ${name}: ${JSON.stringify(v)} (${e.message})`);
    }
}

/** A non-negative nanoton amount given as a decimal string or a safe integer. */
function parseAmount(params, name = 'amount') {
    const v = params[name];
    if (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0) return BigInt(v);
    if (typeof v === 'string' && /^\d+$/.test(v)) return BigInt(v);
    if (v === undefined) throw badRequest(`missing parameter: ${name}`);
    throw badRequest(`parameter ${name} must be a non-negative integer in nanoton (a decimal string), got ${JSON.stringify(v)}`);
}

function decodeBase64(value, what) {
    if (typeof value !== 'string' || value === '') throw badRequest(`${what} must be a non-empty base64 string`);
    const s = value.trim();
    if (!/^[A-Za-z0-9+/_-]+={0,2}$/.test(s) || s.replace(/=+$/, '').length % 4 === 1) {
        throw badRequest(`${what} is not valid base64`);
    }
    return Buffer.from(s, 'base64');
}

/** A 32-byte hash given as 64 hex characters or base64 (standard or url-safe). */
function parseHash(value, what) {
    if (typeof value !== 'string') throw badRequest(`${what} must be a string`);
    const buf = /^[0-9a-fA-F]{64}$/.test(value) ? Buffer.from(value, 'hex') : decodeBase64(value, what);
    if (buf.length !== 32) throw badRequest(`${what} must be 32 bytes (64 hex characters or base64), got ${buf.length} bytes`);
    return buf;
}

function parseUint(value, what) {
    const s = typeof value === 'number' ? String(value) : value;
    if (typeof s !== 'string' || !/^\d+$/.test(s)) throw badRequest(`${what} must be a non-negative integer, got ${JSON.stringify(value)}`);
    return BigInt(s);
}

// --------------------------------------------------------------- formatting

const b64 = (buf) => Buffer.from(buf).toString('base64');
const bocB64 = (cell) => b64(cell.toBoc());
const friendly = (addr, bounceable = true) => addr.toString({ urlSafe: true, bounceable });
const bigintHash = (n) => Buffer.from(n.toString(16).padStart(64, '0'), 'hex');

function hexNum(n) {
    return n < 0n ? `-0x${(-n).toString(16)}` : `0x${n.toString(16)}`;
}

function stackItemJson(item) {
    switch (item.type) {
        case 'int':
            return ['num', hexNum(item.value)];
        case 'null':
            return ['null', null];
        case 'nan':
            return ['num', 'NaN'];
        case 'cell':
        case 'slice':
        case 'builder':
            return [item.type, { bytes: bocB64(item.cell) }];
        case 'tuple':
            return ['tuple', { '@type': 'tvm.tuple', elements: item.items.map(stackItemJson) }];
        default:
            return [item.type, null];
    }
}

function parseStackItem(entry, index) {
    if (!Array.isArray(entry) || entry.length !== 2) {
        throw badRequest(`stack[${index}] must be a [type, value] pair`);
    }
    const [type, value] = entry;
    if (type === 'num' || type === 'int') {
        const s = typeof value === 'number' && Number.isSafeInteger(value) ? String(value) : value;
        if (typeof s !== 'string' || !/^-?(0x[0-9a-fA-F]+|\d+)$/.test(s)) {
            throw badRequest(`stack[${index}]: a num must be a decimal or 0x-hex integer, got ${JSON.stringify(value)}`);
        }
        const negative = s.startsWith('-');
        const magnitude = BigInt(negative ? s.slice(1) : s);
        return { type: 'int', value: negative ? -magnitude : magnitude };
    }
    if (type === 'cell' || type === 'tvm.Cell' || type === 'slice' || type === 'tvm.Slice') {
        const bytes = typeof value === 'object' && value !== null ? value.bytes : value;
        let cell;
        try {
            cell = Cell.fromBoc(decodeBase64(bytes, `stack[${index}]`))[0];
        } catch (e) {
            if (e instanceof HttpError) throw e;
            throw badRequest(`stack[${index}]: invalid BOC (${e.message})`);
        }
        return type.toLowerCase().includes('slice') ? { type: 'slice', cell } : { type: 'cell', cell };
    }
    throw badRequest(`stack[${index}]: unsupported type ${JSON.stringify(type)} (num, cell, slice)`);
}

/** toncenter's raw.message for a message cell exactly as it is in the transaction. */
function messageJson(cell, hashOverride) {
    const msg = loadMessage(cell.beginParse());
    const info = msg.info;
    let source = '';
    let destination = '';
    let value = '0';
    let fwdFee = '0';
    let ihrFee = '0';
    let createdLt = '0';
    if (info.type === 'internal') {
        source = friendly(info.src, true);
        destination = friendly(info.dest, info.bounce);
        value = info.value.coins.toString();
        fwdFee = info.forwardFee.toString();
        ihrFee = info.ihrFee.toString();
        createdLt = info.createdLt.toString();
    } else if (info.type === 'external-in') {
        destination = friendly(info.dest, true);
    } else {
        source = friendly(info.src, true);
        createdLt = info.createdLt.toString();
    }
    return {
        '@type': 'raw.message',
        hash: b64(hashOverride ?? cell.hash()),
        source,
        destination,
        value,
        fwd_fee: fwdFee,
        ihr_fee: ihrFee,
        created_lt: createdLt,
        body_hash: b64(msg.body.hash()),
        msg_data: {
            '@type': 'msg.dataRaw',
            body: bocB64(msg.body),
            init_state: msg.init ? bocB64(beginCell().store(storeStateInit(msg.init)).endCell()) : '',
        },
        message: '',
    };
}

// The JSON of the newest transactions made by external messages (the wallet's), rendered as they execute: one with
// 255 transfers is ~250 KB and takes ~100 ms to render, and the settler looks at the wallet's newest again and
// again. A page of them (at most 100) is served without rendering; any other transaction is rendered from its BOC
// when asked for.
const RENDERED_KEPT = 100;
const rendered = new Map(); // record -> JSON, oldest first

function transactionJson(rec) {
    return rendered.get(rec) ?? renderTransaction(rec, loadTransaction(Cell.fromBoc(rec.boc)[0].beginParse()));
}

function keepRendered(rec, json) {
    rendered.set(rec, json);
    if (rendered.size > RENDERED_KEPT) rendered.delete(rendered.keys().next().value);
}

/** toncenter's raw.transaction for a record and its transaction (the sandbox's, or parsed from the record's BOC). */
function renderTransaction(rec, tx) {
    // The messages exactly as recorded in the transaction cell (not
    // re-serialised), so their hashes are the chain's.
    const msgs = tx.raw.refs[0].beginParse();
    const inCell = msgs.loadMaybeRef();
    const outDict = msgs.loadDict(Dictionary.Keys.Uint(15), Dictionary.Values.Cell());
    const outCells = [...outDict].sort((a, b) => a[0] - b[0]).map(([, cell]) => cell);
    const d = tx.description;
    const generic = d.type === 'generic';
    const compute = generic ? d.computePhase : undefined;
    const action = generic ? d.actionPhase : undefined;
    const fee = tx.totalFees.coins;
    const storageFee = (generic && d.storagePhase?.storageFeesCollected) || 0n;
    return {
        '@type': 'raw.transaction',
        address: { '@type': 'accountAddress', account_address: friendly(rec.address, true) },
        utime: tx.now,
        data: bocB64(tx.raw),
        transaction_id: { '@type': 'internal.transactionId', lt: tx.lt.toString(), hash: b64(tx.hash()) },
        fee: fee.toString(),
        storage_fee: storageFee.toString(),
        other_fee: (fee - storageFee).toString(),
        in_msg: inCell ? messageJson(inCell, rec.inMsgHash) : null,
        out_msgs: outCells.map((cell) => messageJson(cell)),
        description: {
            aborted: generic ? d.aborted : false,
            compute_exit_code: compute?.type === 'vm' ? compute.exitCode : null,
            action_result_code: action ? action.resultCode : null,
            total_actions: action ? action.totalActions : null,
            skipped_actions: action ? action.skippedActions : null,
        },
    };
}

// -------------------------------------------------------------------- chain

class Chain {
    static async create(opts) {
        const chain = new Chain();
        chain.bc = await Blockchain.create();
        chain.bc.verbosity = { print: false, blockchainLogs: false, vmLogs: 'none', debugLogs: false };
        chain.externalsMode = 'execute';
        chain.byAccount = new Map(); // raw address -> records, oldest first
        const reserve = opts.balance + TREASURY_RESERVE;
        chain.treasury = await chain.bc.treasury('cocoon-ton-local', { balance: reserve });
        chain.wallet = WalletContractV5R1.create({ workchain: 0, publicKey: opts.publicKey });
        // Deploy with state init from the treasury, then set the balance to
        // exactly what was asked (the deploying transaction's own gas would
        // otherwise take a little of it).
        // Undeployed: funded without the state init, so the account stays uninitialized.
        const deploy = await chain.treasury.send({
            to: chain.wallet.address,
            value: opts.balance > 0n ? opts.balance : 1_000_000_000n,
            init: opts.undeployed ? undefined : chain.wallet.init,
            bounce: false,
        });
        chain.record(deploy.transactions);
        const contract = await chain.bc.getContract(chain.wallet.address);
        const expected = opts.undeployed ? 'uninit' : 'active';
        if (contract.accountState?.type !== expected) {
            throw new Error(`wallet ${chain.wallet.address} is ${contract.accountState?.type}, not ${expected}, after funding`);
        }
        contract.balance = opts.balance;
        return chain;
    }

    /**
     * Records transactions from a sandbox result; the first may carry the hash its external message was received
     * with. A record keeps the transaction's BOC, not the sandbox's object (which holds logs, both account states
     * and links to its parent and children: about 23 KB each), and the sandbox's own list of every transaction is
     * emptied (this server never reads it): the records grow by a BOC per transaction, not by 23 KB.
     */
    record(transactions, firstInMsgHash) {
        transactions.forEach((tx, i) => {
            const dest = tx.inMessage?.info?.dest;
            const address = Address.isAddress(dest) ? dest : new Address(0, bigintHash(tx.address));
            const key = address.toRawString();
            if (!this.byAccount.has(key)) this.byAccount.set(key, []);
            const rec = {
                boc: tx.raw.toBoc({ idx: false, crc32: false }),
                lt: tx.lt,
                hash: tx.hash(),
                address,
                inMsgHash: i === 0 ? firstInMsgHash : undefined,
            };
            this.byAccount.get(key).push(rec);
            // The wallet's transaction for an external message is what the settler asks for next.
            if (rec.inMsgHash !== undefined) keepRendered(rec, renderTransaction(rec, tx));
        });
        this.bc.transactions.length = 0;
    }

    async ensureTreasury(amount) {
        const contract = await this.bc.getContract(this.treasury.address);
        if (contract.balance < amount + 10_000_000_000n) contract.balance = amount + TREASURY_RESERVE;
    }

    async contract(address) {
        return this.bc.getContract(address);
    }
}

// ---------------------------------------------------------------- endpoints

function summarize(transactions) {
    return transactions
        .map((tx) => {
            const d = tx.description;
            const exit = d.type === 'generic' && d.computePhase.type === 'vm' ? d.computePhase.exitCode : 'skip';
            const act = d.type === 'generic' && d.actionPhase ? d.actionPhase.resultCode : '-';
            const dest = tx.inMessage?.info?.dest;
            return `${Address.isAddress(dest) ? friendly(dest) : '?'} lt=${tx.lt} exit=${exit} action=${act} fee=${tx.totalFees.coins}`;
        })
        .join('; ');
}

function makeRoutes(chain) {
    const routes = new Map();
    const route = (path, methods, handler) => routes.set(path, { methods, handler });

    route('/api/v2/sendBocReturnHash', ['POST'], async (params) => {
        const bytes = decodeBase64(params.boc, 'boc');
        let roots;
        try {
            roots = Cell.fromBoc(bytes);
        } catch (e) {
            throw badRequest(`boc is not a valid bag of cells: ${e.message}`);
        }
        if (roots.length !== 1) throw badRequest(`boc must have exactly one root cell, it has ${roots.length}`);
        const root = roots[0];
        let message;
        try {
            message = loadMessage(root.beginParse());
        } catch (e) {
            throw badRequest(`boc is not a message: ${e.message}`);
        }
        if (message.info.type !== 'external-in') {
            throw badRequest(`boc must be an external-in message, it is ${message.info.type}`);
        }
        const hash = root.hash();
        const result = { '@type': 'raw.extMessageInfo', hash: b64(hash) };
        if (chain.externalsMode === 'drop') {
            log(`FAULT INJECTION: dropped external message ${b64(hash)} to ${friendly(message.info.dest)} without executing it`);
            return result;
        }
        let sent;
        try {
            sent = await chain.bc.sendMessage(message);
        } catch (e) {
            const reason = e.error !== undefined ? `${e.error}${e.exitCode !== undefined ? ` (exitcode=${e.exitCode})` : ''}` : e.message;
            log(`external message ${b64(hash)} to ${friendly(message.info.dest)} rejected: ${reason}`);
            throw new HttpError(500, `LITE_SERVER_UNKNOWN: cannot apply external message to current state : ${reason}`);
        }
        chain.record(sent.transactions, hash);
        log(`external message ${b64(hash)} executed: ${summarize(sent.transactions)}`);
        return result;
    });

    route('/api/v2/getTransactions', ['GET', 'POST'], async (params) => {
        const address = parseAddress(params);
        let limit = 10;
        if (params.limit !== undefined && params.limit !== '') {
            const n = parseUint(params.limit, 'limit');
            if (n < 1n || n > 100n) throw badRequest(`limit must be 1..100, got ${n}`);
            limit = Number(n);
        }
        const hasLt = params.lt !== undefined && params.lt !== '';
        const hasHash = params.hash !== undefined && params.hash !== '';
        if (hasLt !== hasHash) throw badRequest('lt and hash must be given together');
        const toLt = params.to_lt !== undefined && params.to_lt !== '' ? parseUint(params.to_lt, 'to_lt') : 0n;
        const records = chain.byAccount.get(address.toRawString()) ?? []; // oldest first
        let start = records.length - 1;
        if (hasLt) {
            const lt = parseUint(params.lt, 'lt');
            const hash = parseHash(params.hash, 'hash');
            while (start >= 0 && !(records[start].lt === lt && records[start].hash.equals(hash))) start--;
            if (start < 0) {
                throw new HttpError(404, `transaction lt=${lt} hash=${b64(hash)} of ${friendly(address)} not found`);
            }
        }
        const page = [];
        for (let i = start; i >= 0 && page.length < limit && records[i].lt > toLt; i--) page.push(records[i]);
        return page.map(transactionJson);
    });

    route('/api/v2/runGetMethod', ['GET', 'POST'], async (params) => {
        const address = parseAddress(params);
        let method = params.method;
        if (typeof method === 'string' && /^-?\d+$/.test(method)) method = Number(method);
        if (!(typeof method === 'string' && method !== '') && !Number.isSafeInteger(method)) {
            throw badRequest('method must be a get method name or id');
        }
        let stack = params.stack ?? [];
        if (typeof stack === 'string') {
            try {
                stack = stack === '' ? [] : JSON.parse(stack);
            } catch {
                throw badRequest('stack must be a JSON array');
            }
        }
        if (!Array.isArray(stack)) throw badRequest('stack must be an array of [type, value] pairs');
        const args = stack.map(parseStackItem);
        const contract = await chain.contract(address);
        if (contract.accountState?.type !== 'active') {
            return { '@type': 'smc.runResult', gas_used: 0, stack: [], exit_code: NOT_ACTIVE_EXIT_CODE };
        }
        try {
            const res = await contract.get(method, args);
            return { '@type': 'smc.runResult', gas_used: Number(res.gasUsed), stack: res.stack.map(stackItemJson), exit_code: res.exitCode };
        } catch (e) {
            if (typeof e.exitCode === 'number') {
                return { '@type': 'smc.runResult', gas_used: Number(e.gasUsed ?? 0n), stack: [], exit_code: e.exitCode };
            }
            throw new HttpError(500, `get method ${method} failed: ${e.message}`);
        }
    });

    route('/api/v2/getAddressBalance', ['GET', 'POST'], async (params) => {
        const contract = await chain.contract(parseAddress(params));
        return contract.balance.toString();
    });

    route('/api/v2/getAddressInformation', ['GET', 'POST'], async (params) => {
        const contract = await chain.contract(parseAddress(params));
        const type = contract.accountState?.type;
        const state = type === 'active' ? 'active' : type === 'frozen' ? 'frozen' : 'uninitialized';
        const active = type === 'active' ? contract.accountState.state : undefined;
        return {
            '@type': 'raw.fullAccountState',
            balance: contract.balance.toString(),
            state,
            code: active?.code ? bocB64(active.code) : '',
            data: active?.data ? bocB64(active.data) : '',
            last_transaction_id: {
                '@type': 'internal.transactionId',
                lt: contract.lastTransactionLt.toString(),
                hash: b64(bigintHash(contract.lastTransactionHash)),
            },
            frozen_hash: '',
            sync_utime: Math.floor(Date.now() / 1000),
        };
    });

    // Development endpoints: not part of toncenter.
    route('/dev/health', ['GET', 'POST'], async () => ({
        status: 'ok',
        wallet: friendly(chain.wallet.address),
        externals: chain.externalsMode,
    }));

    route('/dev/fund', ['POST'], async (params) => {
        const address = parseAddress(params);
        const amount = parseAmount(params);
        if (amount === 0n) throw badRequest('amount must be positive');
        await chain.ensureTreasury(amount);
        const sent = await chain.treasury.send({ to: address, value: amount, bounce: false });
        chain.record(sent.transactions);
        const balance = (await chain.contract(address)).balance;
        log(`dev: funded ${friendly(address)} with ${amount}, balance now ${balance}`);
        return { balance: balance.toString() };
    });

    route('/dev/set-balance', ['POST'], async (params) => {
        const address = parseAddress(params);
        const amount = parseAmount(params);
        const contract = await chain.contract(address);
        contract.balance = amount;
        log(`dev: set the balance of ${friendly(address)} to ${amount}`);
        return { balance: contract.balance.toString() };
    });

    route('/dev/externals', ['POST'], async (params) => {
        const mode = params.mode;
        if (mode !== 'execute' && mode !== 'drop') throw badRequest('mode must be "execute" or "drop"');
        chain.externalsMode = mode;
        log(`dev: external messages are now ${mode === 'drop' ? 'DROPPED (fault injection)' : 'executed'}`);
        return { mode };
    });

    return routes;
}

// --------------------------------------------------------------------- http

function readBody(req) {
    return new Promise((resolve, reject) => {
        const chunks = [];
        let size = 0;
        req.on('data', (chunk) => {
            size += chunk.length;
            if (size > MAX_BODY_BYTES) {
                reject(new HttpError(413, `request body over ${MAX_BODY_BYTES} bytes`));
                req.destroy();
                return;
            }
            chunks.push(chunk);
        });
        req.on('end', () => resolve(Buffer.concat(chunks)));
        req.on('error', reject);
    });
}

function send(res, status, payload) {
    const body = JSON.stringify(payload);
    res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
    res.end(body);
}

function makeServer(routes, apiKey) {
    // One request at a time against the sandbox, so its state stays consistent.
    let queue = Promise.resolve();
    const serialized = (fn) => {
        const run = queue.then(fn);
        queue = run.catch(() => {});
        return run;
    };

    return http.createServer(async (req, res) => {
        try {
            const url = new URL(req.url, 'http://localhost');
            const params = Object.fromEntries(url.searchParams);
            const body = await readBody(req);
            if (apiKey !== undefined) {
                const given = req.headers['x-api-key'] ?? params.api_key;
                if (given !== apiKey) throw new HttpError(401, 'API key required (X-API-Key header or api_key query parameter)');
            }
            const r = routes.get(url.pathname);
            if (!r) throw new HttpError(404, `no such endpoint: ${url.pathname}`);
            if (!r.methods.includes(req.method)) {
                throw new HttpError(405, `${url.pathname} accepts ${r.methods.join(', ')}, not ${req.method}`);
            }
            if (body.length > 0) {
                let json;
                try {
                    json = JSON.parse(body.toString('utf8'));
                } catch (e) {
                    throw badRequest(`request body is not valid JSON: ${e.message}`);
                }
                if (typeof json !== 'object' || json === null || Array.isArray(json)) {
                    throw badRequest('request body must be a JSON object');
                }
                Object.assign(params, json);
            }
            delete params.api_key;
            const result = await serialized(() => r.handler(params));
            send(res, 200, { ok: true, result });
        } catch (e) {
            const status = e instanceof HttpError ? e.status : 500;
            if (!(e instanceof HttpError)) log(`internal error on ${req.method} ${req.url}:`, e);
            if (!res.headersSent) send(res, status, { ok: false, error: e.message, code: status });
        }
    });
}

// --------------------------------------------------------------------- main

async function main() {
    const opts = parseArgs(process.argv.slice(2));
    const chain = await Chain.create(opts);
    const server = makeServer(makeRoutes(chain), opts.apiKey);

    const shutdown = (why) => {
        log(`exiting: ${why}`);
        server.close();
        process.exit(0);
    };
    process.on('SIGTERM', () => shutdown('SIGTERM'));
    process.on('SIGINT', () => shutdown('SIGINT'));
    if (opts.exitWithStdin) {
        process.stdin.on('end', () => shutdown('stdin closed'));
        process.stdin.on('close', () => shutdown('stdin closed'));
        process.stdin.on('error', () => shutdown('stdin error'));
        process.stdin.resume();
    }

    await new Promise((resolve, reject) => {
        server.once('error', reject);
        server.listen(opts.port, opts.host, resolve);
    });
    server.on('error', (e) => log('server error:', e));
    const addr = server.address();
    const host = addr.address === '0.0.0.0' || addr.address === '::' ? '127.0.0.1' : addr.address;
    const url = `http://${host.includes(':') ? `[${host}]` : host}:${addr.port}`;
    const balance = (await chain.contract(chain.wallet.address)).balance;
    const ready = {
        url,
        wallet: friendly(chain.wallet.address),
        wallet_raw: chain.wallet.address.toRawString(),
        balance: balance.toString(),
    };
    log(`ready at ${url}: wallet v5r1 ${ready.wallet} (${ready.wallet_raw}), balance ${ready.balance} nanoton`);
    process.stdout.write(`${JSON.stringify(ready)}\n`);
}

main().catch((e) => {
    log('fatal:', e);
    process.exit(1);
});
