// Which inbox seqs a device holds: the last contiguous seq (where a resume starts, persisted through a
// SeqStore), the seqs held above it, and whether a pushed seq left a gap. No I/O.

/** Where the last contiguous seq of one device is kept between sessions. */
export interface SeqStore {
  /** The seq to resume from, as a decimal string ('0': nothing held yet). */
  load(): string;
  /** The device now holds every message up to `seq`. */
  save(seq: string): void;
}

/** In memory (the default): share one instance between clients to resume where the last one stopped. */
export class MemorySeqStore implements SeqStore {
  #seq: bigint;
  constructor(seq: string = '0') {
    this.#seq = BigInt(seq);
  }
  load(): string {
    return this.#seq.toString();
  }
  save(seq: string): void {
    if (BigInt(seq) > this.#seq) this.#seq = BigInt(seq);
  }
}

/** Minimal Storage (window.localStorage, or any object with the same two methods). */
export interface StorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
}

/** In the browser's localStorage under `key` (one key per user and device). */
export class LocalStorageSeqStore implements SeqStore {
  readonly #storage: StorageLike;
  readonly #key: string;
  constructor(key: string, storage: StorageLike = globalThis.localStorage) {
    if (!storage) throw new Error('no localStorage here: pass a Storage');
    this.#storage = storage;
    this.#key = key;
  }
  load(): string {
    const v = this.#storage.getItem(this.#key);
    return v && /^\d+$/.test(v) ? v : '0';
  }
  save(seq: string): void {
    if (BigInt(seq) > BigInt(this.load())) this.#storage.setItem(this.#key, seq);
  }
}

/** How many seqs are remembered for deduplication. */
const RECENT = 4096;

/**
 * The seqs a device holds. Seqs increase per user but may have holes, and two sends can commit out of seq
 * order for a few milliseconds: a pushed seq that is not the next one is a gap (sync from the contiguous
 * seq); a completed sync proves nothing else is stored up to its last seq; a late commit still arrives by
 * its push and is delivered, because duplicates are recognised by the seqs held, not by position.
 */
export class SeqTracker {
  #contiguous: bigint;
  #floor: bigint;
  readonly #recent = new Set<bigint>();

  constructor(contiguous: string = '0') {
    this.#contiguous = BigInt(contiguous);
    this.#floor = this.#contiguous;
  }

  get contiguous(): string {
    return this.#contiguous.toString();
  }

  /** Records `seq`; false if it was already held (the app must not see it again). '0' is always new. */
  observe(seq: string): boolean {
    const s = BigInt(seq);
    if (s === 0n) return true;
    if (s <= this.#floor || this.#recent.has(s)) return false;
    this.#recent.add(s);
    if (this.#recent.size > RECENT) {
      let oldest = s;
      for (const r of this.#recent) if (r < oldest) oldest = r;
      this.#recent.delete(oldest);
      if (oldest > this.#floor) this.#floor = oldest;
    }
    this.#advance();
    return true;
  }

  /** A seq above the contiguous one is held while the next one is not. */
  hasGap(): boolean {
    for (const r of this.#recent) if (r > this.#contiguous) return true;
    return false;
  }

  /** A sync completed: nothing else is stored up to `covered`. */
  syncComplete(covered: string): void {
    const c = BigInt(covered);
    if (c > this.#contiguous) this.#contiguous = c;
    this.#advance();
  }

  #advance(): void {
    while (this.#recent.has(this.#contiguous + 1n)) this.#contiguous += 1n;
  }
}
