"""tinygpt on-device tokenizer for llama2.c / sentencepiece-style vocabularies: score-ordered BPE
with byte fallback, over a TTOK version 2 tokenizer section (docs/model-format.md section 6.2).

One file that runs unchanged on MicroPython 1.2x and CPython 3.10+. It reads the section in
place, from bytes or a memoryview (kept, not copied; the buffer must stay alive), and encodes
and decodes exactly as llama2.c's run.c does (the spec names the inputs where run.c has no sane
answer: a NUL in the text, where run.c stops reading).

API
    tok = Tokenizer(section, check=True, index=True)
        Every rule of the spec is checked on load and any broken rule raises ValueError naming
        it (check=False skips only the slowest check, that the sorted index is a permutation of
        the normal tokens in strictly increasing byte order; use it when the engine has already
        checked the section). Nothing else escapes for any input.
        index=True builds a hash table of the normal tokens in RAM (an array of 2 bytes per slot,
        2 to 4 slots per token: 128 KB for Llama 2's 32000 tokens) and looks pieces up there,
        about 2.5x faster than index=False, which uses only the section's sorted index (binary
        search; no table, faster load). Both give the same ids.
    tok.encode(text, bos=False) -> list of ids      (text: str, or bytes)
    tok.decode(ids) -> bytes         (token bytes; after bos_id a non-byte token's leading
                                      space is dropped; ValueError on a bad id)
    tok.token_bytes(id) -> bytes     (as stored, without the BOS rule)
    tok.piece_id(b) -> id of the normal token whose bytes are b, or -1
    tok.vocab_size, tok.bos_id, tok.byte_base, tok.control_ids (tuple), tok.add_dummy_prefix,
    tok.bos_strips_space, tok.max_token_bytes (the longest token), tok.n_normal
    d = Decoder(tok, prev=-1)  (or tok.decoder(prev)):  d.feed(id) -> str, d.flush() -> str
        Streaming: the BOS rule with the id fed before (prev primes it: the id before the first
        one fed, e.g. bos_id when the prompt started with BOS), and UTF-8 held back until a
        character is complete; invalid bytes become U+FFFD exactly like CPython's
        bytes.decode('utf-8', 'replace') (py/bpe.py's _utf8), so the concatenation of every
        feed() and flush() equals tok.decode(ids).decode('utf-8', 'replace') for prev=-1.

Encoding (spec, "Encoding")
 1. [bos_id] if bos; nothing more for an empty text. The dummy prefix: a space before the text,
    a unit of its own (run.c looks it up apart from the text, so b' ' + b'\xbd' is two units).
 2. Units: from each byte, that byte and the continuation bytes (0x80..0xBF) after it, at most 4
    bytes in all (run.c's rule; for valid UTF-8 one unit is one character). A unit that is a
    normal token's bytes is that token, otherwise each of its bytes is its byte token.
 3. Repeatedly the adjacent pair of symbols, neither a byte token, whose joined bytes are a
    normal token's is merged into it: the pair with the highest score, the leftmost on equal
    scores (every symbol covers a contiguous run of the text, so the joined bytes are a slice
    of it).
 Lookups: the hash table (index=True) or a binary search in the section's sorted index within
 the bucket of the first byte (a 257-entry table made at load); never a dict of pieces. The
 merge loop is sentencepiece's: a heap of the candidate pairs, (-score, left symbol, end) so the
 leftmost comes first on equal scores, stale entries skipped when popped; each merge looks up
 only the two new pairs. So a text of n units costs about 2-3n lookups and O(n log n) heap work
 (run.c rescans every pair after every merge: O(n^2) lookups).

Memory (MicroPython): the section itself (not copied when it is bytes or, on MicroPython, a
memoryview; on CPython a memoryview is copied once, as its slices do not compare with <), two
256/257-entry lists, the hash table with index=True, and the module; during an encode a few
lists of n entries and the heap. Measured numbers: docs/performance.md, "The llama2.c tokenizer on MicroPython".
"""

import struct
from array import array

try:
    from heapq import heapify, heappop, heappush
except ImportError:  # MicroPython before 1.20
    from uheapq import heapify, heappop, heappush

from bpe import _utf8  # streaming UTF-8 with CPython's 'replace' rule

_MAGIC = b'TTOK'
_VERSION = 2
_FLAG_PREFIX = 1
_FLAG_BOS_STRIP = 2


def _mv_compares():
    """MicroPython compares a memoryview with bytes (<, ==); CPython only with ==."""
    try:
        return memoryview(b'a') < b'b'
    except TypeError:
        return False


_MVCMP = _mv_compares()
_STRUCT_ERROR = getattr(struct, 'error', ValueError)  # MicroPython's struct has no struct.error


class Tokenizer:
    def __init__(self, section, check=True, index=True):
        try:
            self._load(section, check)
            if index:
                self._build_index()
        except ValueError:
            raise
        except (IndexError, KeyError, TypeError, OverflowError, _STRUCT_ERROR) as e:
            raise ValueError('tokenizer section is corrupt (%s)' % e)

    def _load(self, section, check):
        if isinstance(section, (bytes, bytearray)):
            buf = section
        else:
            try:
                buf = memoryview(section)
            except TypeError:
                raise ValueError('tokenizer section must be bytes or a memoryview')
            if not _MVCMP:
                buf = bytes(buf)  # CPython: slices must compare with <
        size = len(buf)
        if size < 32:
            raise ValueError('tokenizer section is %d bytes, shorter than its 32-byte header' % size)
        if bytes(buf[0:4]) != _MAGIC:
            raise ValueError('tokenizer section magic is %r, expected TTOK' % bytes(buf[0:4]))
        h = struct.unpack_from('<7I', buf, 4)
        nv = h[1]
        bb = h[2]
        bos = h[3]
        nc = h[4]
        flags = h[5]
        bsize = h[6]
        if h[0] != _VERSION:
            raise ValueError('tokenizer section version is %d, expected 2' % h[0])
        if nv < 257 or nv > 65536:
            raise ValueError('tokenizer section n_vocab is %d; out of range 257..65536' % nv)
        if bb > nv - 256:
            raise ValueError('tokenizer section byte_base %d + 256 byte tokens exceeds n_vocab %d' % (bb, nv))
        if bos >= nv:
            raise ValueError('tokenizer section bos_id %d is >= n_vocab %d' % (bos, nv))
        if nc < 1 or nc > nv - 256:
            raise ValueError('tokenizer section n_control is %d; out of range 1..%d' % (nc, nv - 256))
        if flags & ~3:
            raise ValueError('tokenizer section flags 0x%x has unknown bits (allowed: 0x3)' % flags)
        if bsize > size:
            raise ValueError('tokenizer section bytes_size %d exceeds the section (%d bytes)' % (bsize, size))
        boff = 36 + 4 * nv
        soff = boff + ((bsize + 3) & ~3)
        coff = soff + 4 * nv
        ioff = coff + 4 * nc
        want = ioff + 4 * (nv - 256 - nc)
        if size != want:
            raise ValueError('tokenizer section is %d bytes, its header implies %d' % (size, want))
        # tok_off: 0, never decreasing, ends at bytes_size; the longest token
        prev = 0
        longest = 0
        t = 0
        while t <= nv:
            cnt = nv + 1 - t
            if cnt > 256:
                cnt = 256
            offs = struct.unpack_from('<%dI' % cnt, buf, 32 + 4 * t)
            for j in range(cnt):
                o = offs[j]
                if t + j == 0:
                    if o != 0:
                        raise ValueError('tokenizer section tok_off[0] is %d, expected 0' % o)
                elif o < prev:
                    raise ValueError('tokenizer section tok_off decreases at token %d' % (t + j))
                if o - prev > longest:
                    longest = o - prev
                prev = o
            t += cnt
        if prev != bsize:
            raise ValueError('tokenizer section tok_off[n_vocab] is %d, expected bytes_size %d' % (prev, bsize))
        for k in range(boff + bsize, soff):
            if buf[k]:
                raise ValueError('tokenizer section padding after the token bytes is not zero')
        self._buf = buf
        self._nv = nv
        self._boff = boff
        self._soff = soff
        self._ioff = ioff
        # byte tokens: byte_base + b is the single byte b
        for b in range(256):
            o = struct.unpack_from('<II', buf, 32 + 4 * (bb + b))
            if o[1] - o[0] != 1 or buf[boff + o[0]] != b:
                raise ValueError('tokenizer section token %d (byte_base + 0x%02x) is not the single byte 0x%02x'
                                 % (bb + b, b, b))
        # scores: finite (exponent bits not all ones), read from the two high bytes
        for t in range(nv):
            p = soff + 4 * t
            if buf[p + 3] & 0x7F == 0x7F and buf[p + 2] & 0x80:
                raise ValueError('tokenizer section score of token %d is not finite' % t)
        # control ids: strictly increasing, < n_vocab, not byte tokens; bos_id is one of them
        ctl = struct.unpack_from('<%dI' % nc, buf, coff)
        last = -1
        for c in ctl:
            if c >= nv:
                raise ValueError('tokenizer section control id %d is >= n_vocab %d' % (c, nv))
            if c <= last:
                raise ValueError('tokenizer section control ids are not strictly increasing at %d' % c)
            if bb <= c < bb + 256:
                raise ValueError('tokenizer section control id %d is a byte token' % c)
            last = c
        if bos not in ctl:
            raise ValueError('tokenizer section bos_id %d is not a control id' % bos)
        nn = nv - 256 - nc
        if check:
            self._check_sorted(ctl, bb, nn)
        self.vocab_size = nv
        self.bos_id = bos
        self.byte_base = bb
        self.control_ids = ctl
        self.add_dummy_prefix = bool(flags & _FLAG_PREFIX)
        self.bos_strips_space = bool(flags & _FLAG_BOS_STRIP)
        self.max_token_bytes = longest
        self.n_normal = nn
        # bucket table: bk[c] .. bk[c + 1] is the range of sorted entries whose first byte is c
        bk = [0] * 257
        lo = 0
        for c in range(256):
            hi = nn
            while lo < hi:
                mid = (lo + hi) >> 1
                if self._first_byte(mid) < c:
                    lo = mid + 1
                else:
                    hi = mid
            bk[c] = lo
        bk[256] = nn
        self._bk = bk
        # single-byte units: the one-byte token [c] is the first entry of its bucket, if any
        u1 = [-1] * 256
        for c in range(256):
            k = bk[c]
            if k < bk[c + 1]:
                t = self._sorted_id(k)
                o = struct.unpack_from('<II', buf, 32 + 4 * t)
                if o[1] - o[0] == 1:
                    u1[c] = t
        self._u1 = u1
        self._lookup = self._find_sorted
        self._startswith = getattr(buf, 'startswith', None)  # bytes: compare without a copy

    def _check_sorted(self, ctl, bb, nn):
        buf = self._buf
        boff = self._boff
        nv = self._nv
        seen = bytearray(nv)
        for c in ctl:
            seen[c] = 1
        for b in range(256):
            seen[bb + b] = 1
        prevb = None
        k = 0
        while k < nn:
            cnt = nn - k
            if cnt > 256:
                cnt = 256
            ids = struct.unpack_from('<%dI' % cnt, buf, self._ioff + 4 * k)
            for j in range(cnt):
                t = ids[j]
                if t >= nv:
                    raise ValueError('tokenizer section sorted id %d (entry %d) is >= n_vocab %d' % (t, k + j, nv))
                if seen[t]:
                    if (bb <= t < bb + 256) or t in ctl:
                        raise ValueError('tokenizer section sorted id %d (entry %d) is a byte or control token'
                                         % (t, k + j))
                    raise ValueError('tokenizer section sorted id %d is listed twice' % t)
                seen[t] = 1
                o = struct.unpack_from('<II', buf, 32 + 4 * t)
                if o[1] == o[0]:
                    raise ValueError('tokenizer section normal token %d has empty bytes' % t)
                cur = buf[boff + o[0]:boff + o[1]]
                if prevb is not None and not prevb < cur:
                    raise ValueError('tokenizer section sorted ids are not in strictly increasing byte order '
                                     'at entry %d (token %d)' % (k + j, t))
                prevb = cur
            k += cnt

    def _sorted_id(self, k):
        return struct.unpack_from('<I', self._buf, self._ioff + 4 * k)[0]

    def _first_byte(self, k):
        t = struct.unpack_from('<I', self._buf, self._ioff + 4 * k)[0]
        return self._buf[self._boff + struct.unpack_from('<I', self._buf, 32 + 4 * t)[0]]

    # ------------------------------------------------------------------ lookup

    def _build_index(self):
        """An open-addressing hash table (linear probing, load <= 1/2) of the normal tokens:
        2 bytes per slot (4 when n_vocab is 65536), slot = id + 1, 0 = empty. The hash of bytes
        b (inlined here and in _find_hashed; small ints only, also on 32-bit ports):
            h = len(b); for each byte c: h = (33 * h + c) & 0xFFFFF
            h = (h ^ (h >> 9)) & 0xFFFF; h = (h * 0x2C1B) & 0x3FFFFFFF; slot = (h ^ (h >> 16)) & mask
        Not part of the format: a reader may index the section however it likes."""
        nn = self.n_normal
        size = 256
        while size < 2 * nn:
            size <<= 1
        mask = size - 1
        wide = self._nv > 65535
        tab = array('I' if wide else 'H', bytes((4 if wide else 2) * size))
        buf = self._buf
        boff = self._boff
        k = 0
        while k < nn:
            cnt = nn - k
            if cnt > 256:
                cnt = 256
            ids = struct.unpack_from('<%dI' % cnt, buf, self._ioff + 4 * k)
            for t in ids:
                o = struct.unpack_from('<II', buf, 32 + 4 * t)
                i = boff + o[0]
                j = boff + o[1]
                h = j - i
                while i < j:  # the hash (_build_index docstring)
                    h = ((h << 5) + h + buf[i]) & 0xFFFFF
                    i += 1
                h = (h ^ (h >> 9)) & 0xFFFF
                h = (h * 0x2C1B) & 0x3FFFFFFF
                h = (h ^ (h >> 16)) & mask
                while tab[h]:
                    h = (h + 1) & mask
                tab[h] = t + 1
            k += cnt
        self._tab = tab
        self._mask = mask
        self._lookup = self._find_hashed

    def _find_hashed(self, s, i, j):
        """The normal token whose bytes are s[i:j] (j > i), or -1: hash table."""
        buf = self._buf
        boff = self._boff
        tab = self._tab
        mask = self._mask
        startswith = self._startswith
        n = j - i
        h = n
        k = i
        while k < j:  # the hash (_build_index docstring)
            h = ((h << 5) + h + s[k]) & 0xFFFFF
            k += 1
        h = (h ^ (h >> 9)) & 0xFFFF
        h = (h * 0x2C1B) & 0x3FFFFFFF
        h = (h ^ (h >> 16)) & mask
        key = None
        while True:
            v = tab[h]
            if not v:
                return -1
            o = struct.unpack_from('<II', buf, 28 + 4 * v)  # tok_off[v - 1], tok_off[v]
            if o[1] - o[0] == n:
                if key is None:
                    key = s[i:j]
                if startswith is None:
                    if buf[boff + o[0]:boff + o[1]] == key:
                        return v - 1
                elif startswith(key, boff + o[0]):
                    return v - 1
            h = (h + 1) & mask

    def _find_sorted(self, s, i, j):
        return self._find(s[i:j])

    def _find(self, key):
        """The normal token whose bytes are key (non-empty bytes), or -1: binary search in the
        bucket of key[0]. The entries there all start with key[0], so most steps are decided by
        the second byte, read in place; only on a tie there is the piece sliced out."""
        buf = self._buf
        boff = self._boff
        ioff = self._ioff
        n = len(key)
        c = key[0]
        c1 = key[1] if n > 1 else -1
        lo = self._bk[c]
        hi = self._bk[c + 1]
        while lo < hi:
            mid = (lo + hi) >> 1
            q = ioff + 4 * mid
            t = buf[q] | (buf[q + 1] << 8)  # ids < 65536
            q = 32 + 4 * t
            a = boff + (buf[q] | (buf[q + 1] << 8) | (buf[q + 2] << 16) | (buf[q + 3] << 24))
            b = boff + (buf[q + 4] | (buf[q + 5] << 8) | (buf[q + 6] << 16) | (buf[q + 7] << 24))
            d = buf[a + 1] if b - a > 1 else -1  # the piece's second byte (-1: it has none)
            if d < c1:
                lo = mid + 1
            elif d > c1:
                hi = mid
            else:
                p = buf[a:b]
                if p < key:
                    lo = mid + 1
                elif p == key:
                    return t
                else:
                    hi = mid
        return -1

    def piece_id(self, b):
        b = bytes(b)
        if not b or len(b) > self.max_token_bytes:
            return -1
        return self._find(b)

    # ------------------------------------------------------------------ decoding

    def token_bytes(self, t):
        if t < 0 or t >= self._nv:
            raise ValueError('token id %d is out of range 0..%d' % (t, self._nv - 1))
        o = struct.unpack_from('<II', self._buf, 32 + 4 * t)
        return bytes(self._buf[self._boff + o[0]:self._boff + o[1]])

    def _piece(self, t, prev):
        """token_bytes(t) with the BOS rule, t following prev."""
        b = self.token_bytes(t)
        if (prev == self.bos_id and self.bos_strips_space and b[:1] == b' '
                and not (self.byte_base <= t < self.byte_base + 256)):
            return b[1:]
        return b

    def decode(self, ids):
        out = []
        prev = -1
        for t in ids:
            out.append(self._piece(t, prev))
            prev = t
        return b''.join(out)

    def decoder(self, prev=-1):
        return Decoder(self, prev)

    # ------------------------------------------------------------------ encoding

    def encode(self, text, bos=False):
        if isinstance(text, str):
            s = text.encode('utf-8')
        else:
            s = bytes(text)
        out = [self.bos_id] if bos else []
        if not s:
            return out
        n = len(s)
        u1 = self._u1
        bb = self.byte_base
        find = self._lookup
        if self.add_dummy_prefix:  # a unit of its own, whatever follows it
            s = b' ' + s
            n += 1
        # at most one symbol per byte: the lists are made at full size before any garbage, so a
        # long text does not need large blocks of a fragmented heap later
        ids = [0] * n
        pos = [0] * (n + 1)
        m = 0
        i = 0
        if self.add_dummy_prefix:
            t = u1[32]
            ids[0] = t if t >= 0 else bb + 32
            m = 1
            i = 1
        while i < n:
            j = i + 1
            while j < n and j - i < 4 and s[j] & 0xC0 == 0x80:
                j += 1
            if j == i + 1:
                t = u1[s[i]]
            else:
                t = find(s, i, j)
            if t >= 0:
                ids[m] = t
                pos[m] = i
                m += 1
            else:
                for k in range(i, j):
                    ids[m] = bb + s[k]
                    pos[m] = k
                    m += 1
            i = j
        if m > 1:
            pos[m] = n
            self._merge(s, ids, pos, m)
            for k in range(m):
                t = ids[k]
                if t >= 0:
                    out.append(t)
        else:
            out.append(ids[0])
        return out

    def _merge(self, s, ids, pos, m):
        """Merge the symbols ids[0..m) in place (merged-away symbols become -1). pos[k] is where
        symbol k starts in s; symbol k ends where the next live symbol starts (pos[m] = len(s))."""
        buf = self._buf
        soff = self._soff
        find = self._lookup
        maxb = self.max_token_bytes
        bb = self.byte_base
        be = bb + 256
        nxt = list(range(1, m + 1))
        prv = list(range(-1, m - 1))
        heap = [None] * m  # filled, then cut: made before the lookups' garbage
        w = 0
        for k in range(m - 1):
            a = ids[k]
            b = ids[k + 1]
            if bb <= a < be or bb <= b < be:
                continue
            st = pos[k]
            e = pos[k + 2]
            if e - st > maxb:
                continue
            t = find(s, st, e)
            if t >= 0:
                heap[w] = (-struct.unpack_from('<f', buf, soff + 4 * t)[0], k, e, t)
                w += 1
        del heap[w:]
        heapify(heap)
        while heap:
            x = heappop(heap)
            k = x[1]
            if ids[k] < 0:
                continue
            r = nxt[k]
            if r >= m:
                continue
            nr = nxt[r]
            if pos[nr] != x[2]:
                continue  # stale: one side has grown since
            ids[k] = x[3]
            ids[r] = -1
            nxt[k] = nr
            if nr < m:
                prv[nr] = k
                # the pair (k, nr)
                b = ids[nr]
                if not (bb <= b < be):
                    st = pos[k]
                    e = pos[nxt[nr]]
                    if e - st <= maxb:
                        t = find(s, st, e)
                        if t >= 0:
                            heappush(heap, (-struct.unpack_from('<f', buf, soff + 4 * t)[0], k, e, t))
            p = prv[k]
            if p >= 0:
                a = ids[p]
                if not (bb <= a < be):
                    st = pos[p]
                    e = pos[nr]
                    if e - st <= maxb:
                        t = find(s, st, e)
                        if t >= 0:
                            heappush(heap, (-struct.unpack_from('<f', buf, soff + 4 * t)[0], p, e, t))


class Decoder:
    """Streaming decoder: feed(id) -> the text completed so far (str)."""

    def __init__(self, tok, prev=-1):
        self._tok = tok
        self._pend = b''
        self._prev = prev

    def feed(self, token_id):
        b = self._pend + self._tok._piece(token_id, self._prev)
        self._prev = token_id
        text, k = _utf8(b, False)
        self._pend = b[k:]
        return text

    def flush(self):
        text, k = _utf8(self._pend, True)
        self._pend = b''
        return text
