#!/usr/bin/env node
// Runs N OpAMP agents of the npm `@elastic/opamp-client-node` (plain HTTP) in one process.
//
//   node tests/interop/node_agent.mjs \
//       --endpoint http://127.0.0.1:4320/v1/opamp --count 3 --name-prefix node-agent
//
// Each agent reports service.name=<prefix>-<i>, applies remote configs (FAILED
// with "rejected: config contains INVALID" when a body contains INVALID, else
// APPLIED), logs to stderr and runs until SIGTERM/SIGINT, then shuts down and
// exits 0. The library can report neither effective config nor health, and
// sends no agent_disconnect (see README.md).
//
// The package is loaded from the interop cache made by install.sh:
// $OPAMP_INTEROP_CACHE/node (default <repo>/.cache/interop/node).

import {createRequire} from 'node:module';
import os from 'node:os';
import path from 'node:path';
import {fileURLToPath} from 'node:url';
import {parseArgs} from 'node:util';

const REJECT_MESSAGE = 'rejected: config contains INVALID';
const SERVICE_VERSION = '0.1.0';

const here = path.dirname(fileURLToPath(import.meta.url));
const cacheDir =
    process.env.OPAMP_INTEROP_CACHE || path.join(here, '..', '..', '.cache', 'interop');
const nodeDir = path.join(cacheDir, 'node');

function fatal(msg) {
    process.stderr.write(`node_agent.mjs: ${msg}\n`);
    process.exit(2);
}

let lib, libVersion;
try {
    const require = createRequire(path.join(nodeDir, 'package.json'));
    lib = require('@elastic/opamp-client-node');
    libVersion = require('@elastic/opamp-client-node/package.json').version;
} catch (err) {
    fatal(`cannot load @elastic/opamp-client-node from ${nodeDir} (${err.message}); run tests/interop/install.sh`);
}
const {createOpAMPClient, AgentCapabilities, RemoteConfigStatuses} = lib;

let args;
try {
    ({values: args} = parseArgs({
        options: {
            endpoint: {type: 'string'},
            count: {type: 'string', default: '1'},
            'name-prefix': {type: 'string', default: 'node-agent'},
            interval: {type: 'string', default: '1'},
            verbose: {type: 'boolean', default: false},
            help: {type: 'boolean', default: false},
        },
    }));
} catch (err) {
    fatal(err.message);
}
if (args.help) {
    process.stdout.write(
        'usage: node_agent.mjs --endpoint URL [--count N] [--name-prefix P] [--interval SECONDS] [--verbose]\n'
    );
    process.exit(0);
}
if (!args.endpoint) fatal('--endpoint is required');
const count = Number(args.count);
const interval = Number(args.interval);
if (!Number.isInteger(count) || count < 1) fatal('--count must be an integer >= 1');
if (!(interval >= 0.1)) fatal('--interval must be >= 0.1 (the library ignores shorter ones)');

function log(level, msg) {
    process.stderr.write(`${new Date().toISOString()} node_agent ${level} ${msg}\n`);
}

// A Pino-like logger for the library: calls are (obj, msg) or (msg).
function libLogger(name) {
    const make = (level, enabled) => (obj, msg) => {
        if (!enabled) return;
        if (typeof obj === 'string') {
            msg = obj;
            obj = undefined;
        }
        let extra = '';
        if (obj instanceof Error) extra = ` ${obj.message}`;
        else if (obj && obj.err) extra = ` ${obj.err.message ?? obj.err}`;
        else if (obj) {
            try {
                extra = ' ' + JSON.stringify(obj, (_k, v) => (typeof v === 'bigint' ? v.toString() : v));
            } catch {
                extra = '';
            }
        }
        log(level, `${name}: [lib] ${msg}${extra}`);
    };
    return {
        trace: make('TRACE', args.verbose),
        debug: make('DEBUG', args.verbose),
        info: make('INFO', true),
        warn: make('WARN', true),
        error: make('ERROR', true),
        fatal: make('FATAL', true),
    };
}

const hex = (u8) => Buffer.from(u8 ?? []).toString('hex');

function makeAgent(i) {
    const name = `${args['name-prefix']}-${i}`;
    let lastHash = null;
    const client = createOpAMPClient({
        endpoint: args.endpoint,
        log: libLogger(name),
        heartbeatIntervalSeconds: interval,
        // The library rejects any capability beyond these four (ReportsStatus
        // and ReportsHeartbeat are always on).
        capabilities: BigInt(
            AgentCapabilities.AgentCapabilities_ReportsStatus |
                AgentCapabilities.AgentCapabilities_ReportsHeartbeat |
                AgentCapabilities.AgentCapabilities_AcceptsRemoteConfig |
                AgentCapabilities.AgentCapabilities_ReportsRemoteConfig
        ),
        onMessage: ({remoteConfig}) => {
            if (!remoteConfig) return;
            const hash = hex(remoteConfig.configHash);
            // The callback runs for every response that carries the config.
            if (hash === lastHash) return;
            lastHash = hash;
            const files = remoteConfig.config?.configMap ?? {};
            const invalid = Object.values(files).some((f) =>
                Buffer.from(f.body ?? []).includes('INVALID')
            );
            const status = invalid
                ? RemoteConfigStatuses.RemoteConfigStatuses_FAILED
                : RemoteConfigStatuses.RemoteConfigStatuses_APPLIED;
            // errorMessage is always passed: setRemoteConfigStatus() keeps the
            // previous one when the property is absent.
            client.setRemoteConfigStatus({
                lastRemoteConfigHash: remoteConfig.configHash,
                status,
                errorMessage: invalid ? REJECT_MESSAGE : '',
            });
            log(
                'INFO',
                `${name}: remote config hash=${hash} files=${JSON.stringify(Object.keys(files).sort())} -> ` +
                    (invalid ? `FAILED (${REJECT_MESSAGE})` : 'APPLIED')
            );
        },
    });
    client.setAgentDescription({
        identifyingAttributes: {'service.name': name, 'service.version': SERVICE_VERSION},
        nonIdentifyingAttributes: {'host.name': os.hostname(), 'os.type': os.platform()},
    });
    client.start();
    log('INFO', `${name}: started (@elastic/opamp-client-node ${libVersion}) -> ${args.endpoint}`);
    return {name, client};
}

const agents = [];
for (let i = 1; i <= count; i++) agents.push(makeAgent(i));

// A response body the library cannot take (gzip it did not ask for, an
// instance_uid that is not 16 bytes, not protobuf) throws inside its async
// send loop; the client is wedged after that, so exit loudly and non-zero.
for (const ev of ['uncaughtException', 'unhandledRejection']) {
    process.on(ev, (err) => {
        log('FATAL', `${ev} in the OpAMP client (the server's response broke it): ${err?.stack ?? err}`);
        process.exit(3);
    });
}

// The library unref()s its timers, so nothing else would keep the process alive.
const keepAlive = setInterval(() => {}, 1 << 30);

let stopping = false;
async function stop(sig) {
    if (stopping) return;
    stopping = true;
    log('INFO', `${sig}: stopping ${agents.length} agent(s)`);
    const guard = setTimeout(() => {
        log('WARN', 'shutdown took over 10 s, exiting');
        process.exit(0);
    }, 10000);
    await Promise.allSettled(agents.map((a) => a.client.shutdown()));
    clearTimeout(guard);
    clearInterval(keepAlive);
    log('INFO', 'stopped');
    process.exit(0);
}
process.on('SIGTERM', () => stop('SIGTERM'));
process.on('SIGINT', () => stop('SIGINT'));
