# draft.py: guess the next tokens of an answer from the corpus answers, for chat.py to check
# with the model in one pass (speculative decoding; the model has the last word, so answers do
# not change). One file for MicroPython and CPython.
#
# The answers' token ids travel in the model file, in the optional drafts section after the
# model's file_size bytes (docs/model-format.md section 7); engines and readers that do not know
# it never read it. The ids are kept as bytes (u16 little-endian) and searched with bytes.find,
# which runs in C on both interpreters: no index is built, the heap holds the section once.
import struct

MAGIC = b"TDRF"
VERSION = 1
HEADER = 24       # magic, version, n_answers, n_ids, crc32, reserved
MAX_MATCH = 12    # longest context suffix looked up (tokens)
MIN_MATCH = 3     # shorter matches guess wrong too often: on the shipped model's held-out
                  # questions 2 cost 1.34x plain's multiply-adds per token, 3 1.17x (passes on
                  # its training questions 0.23 of plain's with 3, 0.20 with 2)


def _crc32(data):
    try:
        import binascii
        return binascii.crc32(data) & 0xFFFFFFFF
    except (ImportError, AttributeError):  # a port without binascii.crc32: not checked
        return None


def read_section(path):
    """The drafts section of the model file at path: (n_answers, ids bytes), or None when the
    file has none (or is no model file: the engine names that). A section that is there but
    broken raises ValueError naming the problem."""
    with open(path, "rb") as f:
        head = f.read(16)
        if len(head) < 16 or head[:4] != b"TGPT":
            return None
        file_size = struct.unpack("<I", head[12:16])[0]
        f.seek(file_size)
        h = f.read(HEADER)
        if len(h) == 0:
            return None
        if len(h) < HEADER or h[:4] != MAGIC:
            raise ValueError("%s: %d bytes after the model are not a drafts section" % (path, len(h)))
        version, n_answers, n_ids, crc, reserved = struct.unpack("<5I", h[4:])
        if version != VERSION or reserved != 0:
            raise ValueError("%s: drafts section version %d (reserved %d); this reader knows %d"
                             % (path, version, reserved, VERSION))
        data = f.read(2 * n_ids)
        if len(data) != 2 * n_ids or f.read(1):
            raise ValueError("%s: drafts section says %d ids but holds %d bytes"
                             % (path, n_ids, len(data)))
    got = _crc32(data)
    if got is not None and got != crc:
        raise ValueError("%s: drafts section CRC32 mismatch (damaged file)" % path)
    return n_answers, data


class Drafter:
    """Proposes the next tokens: the longest suffix (MIN_MATCH..MAX_MATCH tokens) of the ids so
    far that occurs in the corpus answers, else in the question, and the tokens that follow it
    there. Feed it every id of the prompt and answer with add(); propose(k) -> up to k ids."""

    def __init__(self, answers=b"", eos_id=None):
        self.answers = answers    # u16 LE ids; each answer ends with its eos
        self.eos = eos_id
        self.question = b""       # the prompt's ids, the same way
        self.ctx = bytearray()    # every id so far, the same way

    def start(self, prompt_ids):
        self.question = struct.pack("<%dH" % len(prompt_ids), *prompt_ids)
        self.ctx = bytearray(self.question)

    def add(self, tok):
        self.ctx.extend(struct.pack("<H", tok))

    def propose(self, k):
        n = len(self.ctx) // 2
        top = MAX_MATCH if n > MAX_MATCH else n
        for length in range(top, MIN_MATCH - 1, -1):
            pat = bytes(self.ctx[len(self.ctx) - 2 * length:])
            for src in (self.answers, self.question):
                out = self._follow(src, pat, k)
                if out:
                    return out
        return []

    def _follow(self, src, pat, k):
        at = src.find(pat)
        while at >= 0 and at & 1:  # a match must start on a token boundary
            at = src.find(pat, at + 1)
        if at < 0:
            return None
        start = at + len(pat)
        end = start + 2 * k
        if end > len(src):
            end = len(src) - (len(src) - start) % 2
        out = []
        for i in range(start, end, 2):
            t = src[i] | (src[i + 1] << 8)
            out.append(t)
            if t == self.eos:  # an answer ends here; what follows is another answer
                break
        return out
