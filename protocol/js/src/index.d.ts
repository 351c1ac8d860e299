// Types of the chinwag client: every op, reply, push and client event of docs/protocol.md.
// Ids (`conv`, `shop`, `device_id`, `node_id`) are decimal strings: 64-bit values do not fit a
// JS number. Number fields (`seq`, `ts`, `unread`, `req`, `limit`) are numbers, exact up to
// 2^53 - 1; a larger value from the network is a decode error, never a rounded number.

/** A decimal u64, e.g. `"42"`. */
export type Id = string;
export type UidKind = 'buyer' | 'wechat' | 'agent' | 'service';
/** `"kind:id"`, e.g. `"buyer:1001"`. */
export type Uid = `${UidKind}:${string}`;
export type Device = 'web' | 'ios' | 'android' | 'desktop';
export type ConvType = 'shop' | 'direct' | 'group';
export type ErrorCode =
  | 'bad_request'
  | 'unauthorized'
  | 'not_logged_in'
  | 'not_member'
  | 'not_found'
  | 'too_large'
  | 'rate_limited'
  | 'unavailable'
  | 'internal';
/** Codes the client itself gives to a failed call. */
export type ClientErrorCode = 'timeout' | 'disconnected' | 'closed' | 'kicked' | 'queue_full' | 'bad_reply';

/** A stored message: a `msg` push, a `history_ok` entry, a `convs_ok` last message. */
export interface Msg {
  conv: Id;
  seq: number;
  from: Uid;
  ts: number;
  kind: string;
  body: string;
  cmid: string;
}

// ---- client → server ----
export interface Login { op: 'login'; req?: number; token: string; device: Device }
export type SendTarget = { conv: Id; shop?: never; user?: never } | { shop: Id; conv?: never; user?: never } | { user: Uid; conv?: never; shop?: never };
export type Send = { op: 'send'; req?: number; cmid: string; kind: string; body: string } & SendTarget;
export interface Read { op: 'read'; req?: number; conv: Id; seq: number }
export interface Resolve { op: 'resolve'; req?: number; conv: Id }
export interface History { op: 'history'; req?: number; conv: Id; before?: number; after?: number; limit?: number }
export interface Convs { op: 'convs'; req?: number }
export interface Ping { op: 'ping'; req?: number }
export type Request = Login | Send | Read | Resolve | History | Convs | Ping;

// ---- server → client: replies ----
export interface LoginOk { op: 'login_ok'; req?: number; uid: Uid; device_id: Id; node_id: Id; ts: number }
export interface SendOk { op: 'send_ok'; req?: number; conv: Id; seq: number; ts: number }
export interface ReadOk { op: 'read_ok'; req?: number; conv: Id; seq: number }
export interface ResolveOk { op: 'resolve_ok'; req?: number; conv: Id }
export interface HistoryOk { op: 'history_ok'; req?: number; conv: Id; msgs: Msg[] }
/** A member's nickname and avatar (docs/protocol.md, "Profiles"); absent fields are not set. */
export interface UserProfile { uid: Uid; nick?: string; avatar?: string }
export interface ConvSummary {
  conv: Id;
  type: ConvType;
  /** Present for `shop` conversations. */
  shop?: Id;
  /** Every member, or none for a conversation of more than 200 (a large group). */
  members: Uid[];
  /** How many members it has. */
  member_count: number;
  last_seq: number;
  read_seq: number;
  unread: number;
  last: Msg | null;
  /** What the conversation shows (a shop conversation: its shop's), when set. */
  name?: string;
  avatar?: string;
  /** The members' profiles the gateway holds, when any. */
  profiles?: UserProfile[];
}
export interface ConvsOk { op: 'convs_ok'; req?: number; convs: ConvSummary[] }
export interface Pong { op: 'pong'; req?: number }
export type Reply = LoginOk | SendOk | ReadOk | ResolveOk | HistoryOk | ConvsOk | Pong;

// ---- server → client: pushes ----
/** A message as a `msg` push brings it: with its sender's and its conversation's profiles when
 * set (docs/protocol.md, "Profiles"). Messages recovered from `history` have none. */
export interface ShownMsg extends Msg {
  from_nick?: string;
  from_avatar?: string;
  conv_name?: string;
  conv_avatar?: string;
}
export interface MsgPush extends ShownMsg { op: 'msg' }
export interface Receipt { op: 'receipt'; conv: Id; uid: Uid; seq: number }
export interface Members { op: 'members'; conv: Id; members: Uid[]; profiles?: UserProfile[] }
/** A service changed a direct or group conversation's display name or avatar. */
export interface ConvProfile { op: 'conv_profile'; conv: Id; name?: string; avatar?: string }
export interface Kicked { op: 'kicked'; reason: string }
/** A transient push from a backend service: not stored, no conv, no seq (docs/protocol.md). */
/** A large group's membership change (more than 200 members): what changed and the new count. */
export interface MembersDelta { op: 'members_delta'; conv: Id; added: Uid[]; removed: Uid[]; count: number }
export interface Notify { op: 'notify'; kind: string; body: string; ts: number }
export interface ErrorFrame { op: 'error'; req?: number; code: ErrorCode; message: string }
export type Push = MsgPush | Receipt | Members | MembersDelta | ConvProfile | Kicked | Notify | ErrorFrame;

/** Any message of the protocol, in either direction. */
export type Frame = Request | Reply | Push;
export type Op = Frame['op'];

/** The reply each request resolves with. */
export interface ReplyOf {
  login: LoginOk;
  send: SendOk;
  read: ReadOk;
  resolve: ResolveOk;
  history: HistoryOk;
  convs: ConvsOk;
  ping: Pong;
}

// ---- the client ----
export type State = 'disconnected' | 'connecting' | 'connected';

export interface StateEvent {
  state: State;
  previous: State;
  /** Why: `connecting`, a close reason, `kicked`, `unauthorized`, `closed`. */
  reason?: string;
  /** While waiting to reconnect: the delay before the next attempt. */
  retryInMs?: number;
}

export interface DeliveryInfo {
  /** Came from `history` after a reconnect or a gap, not from a live push. */
  recovered: boolean;
  /** Sent by this client (from its `send_ok`). */
  own: boolean;
}

export interface ClientEvents {
  state: (event: StateEvent) => void;
  login: (event: LoginOk) => void;
  /** Every message of a tracked conversation, once, in seq order. */
  msg: (msg: ShownMsg, info: DeliveryInfo) => void;
  receipt: (event: Omit<Receipt, 'op'>) => void;
  members: (event: Omit<Members, 'op'>) => void;
  /** A conversation's display name or avatar changed. */
  conv_profile: (event: Omit<ConvProfile, 'op'>) => void;
  kicked: (event: { reason: string }) => void;
  disconnect: (event: { code: number; reason: string }) => void;
  /** A problem no call is waiting for: an `error` push, an undecodable frame, a getToken failure. */
  error: (error: Error) => void;
}

export interface BackoffOptions {
  /** The first window (default 500). */
  minMs: number;
  /** The largest window (default 20000). */
  maxMs: number;
}

export interface ClientOptions {
  /** One gateway URL (`ws://host:7000/ws`) or several, tried in turn. */
  urls: string | string[];
  /** The login token; when absent (or refused once), `getToken` is asked. */
  token?: string;
  /** Returns a fresh token (e.g. from the shop's backend). */
  getToken?: () => Promise<string>;
  device?: Device;
  /** `json` (default) or `binary`. */
  codec?: 'json' | 'binary';
  /** Time for a written request's reply (default 5000). */
  requestTimeoutMs?: number;
  /** Time for a connection to open and log in (default 10000). */
  connectTimeoutMs?: number;
  /** How long a call made while disconnected waits for the connection (default 30000). */
  offlineWaitMs?: number;
  /** How long a send is retried before its promise rejects (default 60000). */
  sendDeadlineMs?: number;
  /** Calls waiting for a connection plus unacknowledged sends, at most (default 1000). */
  pendingMax?: number;
  backoff?: Partial<BackoffOptions>;
  /** Interval of the `ping` heartbeat (default 25000; the gateway's idle timeout is 90000). */
  pingIntervalMs?: number;
  /** A ping unanswered this long drops the connection (default 10000). */
  pongTimeoutMs?: number;
  /** `history` page size during recovery (default 200). */
  historyPageLimit?: number;
  /** Delay before retrying a send refused with rate_limited/unavailable (default 1000). */
  retryDelayMs?: number;
  /** A WebSocket class (default: globalThis.WebSocket). */
  WebSocket?: { new (url: string): WebSocket };
  /** Random numbers in [0, 1) for the jitter (default Math.random). */
  random?: () => number;
  /** Where the `online` event is heard (default: globalThis in a browser); null for none. */
  onlineTarget?: EventTarget | null;
}

/** What to send and where: exactly one of `conv`, `shop`, `user`. */
export type SendParams = SendTarget & {
  /** Default `text`. */
  kind?: string;
  body: string;
  /** Default: a fresh id. Reuse one to retry a send the client gave up on. */
  cmid?: string;
};

export declare const DEFAULTS: Readonly<Required<Omit<ClientOptions, 'urls' | 'token' | 'getToken' | 'WebSocket' | 'random' | 'onlineTarget'>>>;
export declare const CLOSE_KICKED: 4001;

export declare class ChinwagError extends Error {
  constructor(code: ErrorCode | ClientErrorCode, message?: string, req?: number);
  code: ErrorCode | ClientErrorCode;
  req?: number;
}

export declare class CodecError extends Error {
  req?: number;
}

export declare class Client {
  constructor(options: ClientOptions);
  readonly state: State;
  readonly uid: Uid | null;
  readonly session: LoginOk | null;
  readonly stats: { connects: number; sendAttempts: number; recovered: number; duplicatesDropped: number };
  on<E extends keyof ClientEvents>(event: E, listener: ClientEvents[E]): () => void;
  off<E extends keyof ClientEvents>(event: E, listener: ClientEvents[E]): void;
  connect(): void;
  disconnect(): void;
  newCmid(): string;
  send(params: SendParams): Promise<SendOk> & { cmid: string };
  read(conv: Id, seq: number): Promise<ReadOk>;
  resolve(conv: Id): Promise<ResolveOk>;
  history(conv: Id, range?: { before?: number; after?: number; limit?: number }): Promise<HistoryOk>;
  convs(): Promise<ConvsOk>;
  ping(): Promise<Pong>;
  /** Any request (without `req`); resolves with its reply. */
  request<O extends Exclude<keyof ReplyOf, 'login'>>(frame: { op: O } & Omit<Partial<Extract<Request, { op: O }>>, 'req' | 'op'>, options?: { timeoutMs?: number; waitMs?: number }): Promise<ReplyOf[O]>;
  track(conv: Id, lastSeq: number): void;
  lastSeq(conv: Id): number | undefined;
}

export declare const BACKOFF_DEFAULTS: Readonly<BackoffOptions>;
export declare function backoffCapMs(attempt: number, options?: BackoffOptions): number;
export declare function backoffDelayMs(attempt: number, options?: BackoffOptions, random?: () => number): number;

export declare const OPS: Readonly<Record<Op, number>>;
export declare const UID_KINDS: readonly UidKind[];
export declare const DEVICES: readonly Device[];
export declare const CONV_TYPES: readonly ConvType[];
export declare const ERROR_CODES: readonly ErrorCode[];

export declare namespace json {
  function encode(frame: Frame): string;
  function decode(text: string): Frame;
}

export declare namespace binary {
  const HEADER_BYTES: 16;
  const VERSION: 1;
  function encode(frame: Frame): Uint8Array;
  function decode(bytes: ArrayBuffer | ArrayBufferView, onError?: (error: CodecError) => void): Frame[];
}
