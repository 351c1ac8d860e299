// Test helpers that run the real `chinwag` binary: start it on 127.0.0.1 with a temporary data
// directory, mint tokens with `chinwag token`, restart it on the same port and data, and a TCP
// proxy that can refuse or black-hole connections to simulate a bad network.

import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import net from 'node:net';
import { fileURLToPath } from 'node:url';

export const ROOT = fileURLToPath(new URL('../../../', import.meta.url));
/** A test secret of the 32 bytes the gateway asks for. */
export const SECRET = 'chinwag-js-tests-secret-0123456789abcdef';
/** Longest a test waits for anything before it fails. */
export const WAIT_MS = 15000;

let built = null;

/** The binary: $CHINWAG_BIN, or target/debug/chinwag built (once) with cargo. */
export function binary() {
  if (process.env.CHINWAG_BIN) return process.env.CHINWAG_BIN;
  if (built) return built;
  const cargo = spawnSync('cargo', ['build', '--quiet', '-p', 'chinwag-engine', '--bin', 'chinwag'], { cwd: ROOT, stdio: 'inherit' });
  if (cargo.status !== 0) throw new Error('cargo build -p chinwag-engine failed (is cargo on PATH?)');
  built = join(ROOT, 'target', 'debug', 'chinwag');
  return built;
}

/** A login token for `uid` (and `shop`, for agents). */
export function token(uid, shop) {
  const args = ['token', '--secret', SECRET, '--uid', uid, '--ttl', '3600'];
  if (shop) args.push('--shop', shop);
  const out = spawnSync(binary(), args, { encoding: 'utf8', env: { PATH: process.env.PATH } });
  if (out.status !== 0) throw new Error(`chinwag token failed: ${out.stderr}`);
  return out.stdout.trim();
}

export class Gateway {
  /** Starts `chinwag serve` (127.0.0.1, port 0 unless `port` is given); resolves once it listens. */
  static async start({ port = 0, dataDir, args = [] } = {}) {
    const g = new Gateway();
    g.dataDir = dataDir ?? mkdtempSync(join(tmpdir(), 'chinwag-js-'));
    g.ownsDir = dataDir === undefined;
    g.args = args;
    await g._spawn(port);
    return g;
  }

  async _spawn(port) {
    const argv = ['serve', `--listen=127.0.0.1:${port}`, '--backend-listen=127.0.0.1:0', '--data-dir', this.dataDir, '--jwt-secret', SECRET, '--shards=2', ...this.args];
    // The tests' own CHINWAG_* settings must not leak into the server.
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('CHINWAG_')));
    this.child = spawn(binary(), argv, { env, stdio: ['ignore', 'ignore', 'pipe'] });
    this.log = [];
    this.exited = new Promise((resolve) => this.child.once('exit', (code, signal) => resolve({ code, signal })));
    const addr = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`gateway did not start:\n${this.log.join('')}`)), WAIT_MS);
      this.child.once('exit', () => {
        clearTimeout(timer);
        reject(new Error(`gateway exited at start:\n${this.log.join('')}`));
      });
      this.child.stderr.setEncoding('utf8');
      this.child.stderr.on('data', (chunk) => {
        this.log.push(chunk);
        const m = /listening addr=(\S+)/.exec(this.log.join(''));
        if (m) {
          clearTimeout(timer);
          resolve(m[1]);
        }
      });
    });
    this.addr = addr;
    this.port = Number(addr.split(':').pop());
  }

  get wsUrl() {
    return `ws://${this.addr}/ws`;
  }

  get httpUrl() {
    return `http://${this.addr}`;
  }

  /** Stops the process (SIGTERM: a drain; SIGKILL: a crash) and waits for it to exit. */
  async stop(signal = 'SIGTERM') {
    this.child.kill(signal);
    return this.exited;
  }

  /** Starts a stopped gateway again on the same port and data directory. */
  async startAgain() {
    await this._spawn(this.port);
  }

  /** Stops and starts again on the same port and data directory. */
  async restart(signal = 'SIGTERM') {
    await this.stop(signal);
    await this.startAgain();
  }

  async close() {
    if (this.child.exitCode === null && this.child.signalCode === null) await this.stop('SIGKILL');
    if (this.ownsDir) rmSync(this.dataDir, { recursive: true, force: true });
  }
}

/**
 * A TCP proxy on 127.0.0.1 in front of `target` (a port). `mode`: `pass` forwards, `refuse`
 * closes new connections at once, `blackhole` keeps them but drops the server's bytes.
 * `cut()` breaks every open connection.
 */
export class Proxy {
  static async start(targetPort) {
    const p = new Proxy();
    p.targetPort = targetPort;
    p.mode = 'pass';
    p.pairs = new Set();
    p.server = net.createServer((client) => p._accept(client));
    await new Promise((resolve) => p.server.listen(0, '127.0.0.1', resolve));
    p.port = p.server.address().port;
    return p;
  }

  _accept(client) {
    if (this.mode === 'refuse') return client.destroy();
    const upstream = net.connect(this.targetPort, '127.0.0.1');
    const pair = { client, upstream };
    this.pairs.add(pair);
    const end = () => {
      client.destroy();
      upstream.destroy();
      this.pairs.delete(pair);
    };
    client.on('error', end).on('close', end);
    upstream.on('error', end).on('close', end);
    client.on('data', (d) => upstream.write(d));
    upstream.on('data', (d) => {
      if (this.mode !== 'blackhole') client.write(d);
    });
  }

  get wsUrl() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  cut() {
    for (const { client, upstream } of this.pairs) {
      client.destroy();
      upstream.destroy();
    }
    this.pairs.clear();
  }

  close() {
    this.cut();
    return new Promise((resolve) => this.server.close(resolve));
  }
}

/** Resolves when `predicate()` holds, checking every 10 ms; rejects after WAIT_MS. */
export async function until(predicate, what) {
  const start = Date.now();
  while (!(await predicate())) {
    if (Date.now() - start > WAIT_MS) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}
