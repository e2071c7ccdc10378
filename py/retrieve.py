# retrieve.py: check the model's answer against the corpus answers by the words a question
# shares with them, and pick the answer. One file for MicroPython and CPython (chat.py on the
# board; tinygpt eval on the PC imports the same code).
#
# Why: a corpus with 1-3 phrasings per answer teaches the model too little to answer a reworded
# question word for word; it half-remembers ("Click the company under Settings > ...") or picks
# a wrong answer. The words of the question still point at the right answer most of the time.
# The model file's meta section (docs/model-format.md section 8) holds the corpus answers and,
# for each, the weighted content words of its questions and its text (TF-IDF, computed by
# `tinygpt train`). The score of an answer is the cosine of the question's and the answer's
# word vectors, in 1/10000, computed in integers so that the board and the PC agree exactly.
#
# The rule (choose()), with the four thresholds of the meta key `retrieval`. A question with no
# content word ("how are you?") keeps the model's answer. Otherwise:
#   - the model's answer is a corpus answer: kept, unless the best-scoring answer scores more
#     than MARGIN above it (then that one);
#   - the model's answer is none of them (a half-remembered mix): the best-scoring answer if it
#     scores at least ACCEPT, else the abstain answer;
#   - the model abstained: kept, unless the best-scoring answer scores at least OVERRIDE;
#   - a corpus answer chosen so far that scores below SUPPORT (the question shares almost no word
#     with it: "what is the capital of france?" -> an answer about a word it happens to share)
#     becomes the abstain answer.
# Without an abstain answer (a model trained without one) the model's answer stays where the rule
# would abstain.
# Measured in docs/recipes.md ("Retrieval on the device").
from topic import content_words

RETRIEVAL_KEY = "retrieval"   # "1 OVERRIDE ACCEPT MARGIN SUPPORT": version 1, thresholds in 1/10000
ANSWER_PREFIX = "answer_"     # answer_<i>: the i-th corpus answer ("\\" and "\n" escaped)
TERMS_PREFIX = "terms_"       # terms_<i>: its words, "word:weight" (weight an int >= 1), space-separated
IDF_KEY = "idf"               # "word:weight ...": each word's weight in a question
UNKNOWN_KEY = "idf_unknown"   # the weight, in a question, of a word no answer has
SCALE = 10000                 # scores and thresholds in 1/10000


def isqrt(n):
    """floor(sqrt(n)) of an int n >= 0, in integers (MicroPython's math has no isqrt, and a
    float sqrt is single precision on the ESP32)."""
    if n < 2:
        return n
    x = 1 << ((n.bit_length() + 1) // 2) if hasattr(n, "bit_length") else n
    while True:
        y = (x + n // x) // 2
        if y >= x:
            return x
        x = y


_UNESCAPE = {"n": "\n", "t": "\t", "r": "\r"}


def unescape(s):
    """The text of an answer_<i> value: "\\n", "\\t", "\\r" and "\\\\" stand for the characters."""
    out = []
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            i += 1
            c = _UNESCAPE.get(s[i], s[i])
        out.append(c)
        i += 1
    return "".join(out)


def escape(s):
    return s.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def _pairs(value, what):
    """"word:weight word:weight" -> (word, int weight >= 1) one by one; ValueError naming what.
    A generator that walks the string: value.split(" ") of the idf line would hold a list of
    thousands of strings at once in the board's heap."""
    start, end = 0, len(value)
    while start < end:
        stop = value.find(" ", start)
        if stop < 0:
            stop = end
        item = value[start:stop]
        start = stop + 1
        if not item:
            continue
        i = item.rfind(":")
        if i <= 0:
            raise ValueError("meta %s: %r is not word:weight" % (what, item[:40]))
        try:
            w = int(item[i + 1:])
        except ValueError:
            raise ValueError("meta %s: %r is not word:weight" % (what, item[:40]))
        if w < 1:
            raise ValueError("meta %s: weight %d of %r is below 1" % (what, w, item[:i]))
        yield item[:i], w


class Index:
    """The corpus answers and their word vectors, from the meta section's key/value dict.
    Raises ValueError naming the problem when the keys are there but broken."""

    def __init__(self, meta):
        head = meta[RETRIEVAL_KEY].split(" ")
        if len(head) != 5 or head[0] != "1":
            raise ValueError("meta retrieval: %r is not '1 OVERRIDE ACCEPT MARGIN SUPPORT'" % meta[RETRIEVAL_KEY][:60])
        try:
            self.override, self.accept, self.margin, self.support = [int(x) for x in head[1:]]
        except ValueError:
            raise ValueError("meta retrieval: thresholds %r are not integers" % " ".join(head[1:]))
        # word -> [its weight in a question, bytearray of (answer index, weight) as u16 pairs,
        # bytes filled]: a few bytes per posting, not a tuple each. Two passes over the answers'
        # terms (count, then fill), so that each bytearray is allocated once at its size: grown
        # posting by posting, thousands of them fragmented a board's heap to several times the
        # index's size (measured: 1.65 MB of free heap needed for a 180 KB index).
        self.words = {}
        for word, w in _pairs(meta.get(IDF_KEY, ""), IDF_KEY):
            self.words[word] = [w, 0, 0]
        try:
            self.unknown = int(meta.get(UNKNOWN_KEY, "0"))
        except ValueError:
            raise ValueError("meta %s: %r is not an integer" % (UNKNOWN_KEY, meta[UNKNOWN_KEY][:40]))
        n = 0
        while (ANSWER_PREFIX + str(n)) in meta:
            key = TERMS_PREFIX + str(n)
            if key not in meta:
                raise ValueError("meta: answer_%d has no %s" % (n, key))
            if n > 0xFFFF:
                raise ValueError("meta: more than 65536 answers")
            for word, w in _pairs(meta[key], key):
                entry = self.words.get(word)
                if entry is None:
                    raise ValueError("meta %s: word %r is not in idf" % (key, word))
                if w > 0xFFFF:
                    raise ValueError("meta %s: weight %d of %r is above 65535" % (key, w, word))
                entry[1] += 4
            n += 1
        for entry in self.words.values():
            entry[1] = bytearray(entry[1])
        self.answers = []
        self.norms = []
        for i in range(n):
            sq = 0
            for word, w in _pairs(meta[TERMS_PREFIX + str(i)], ""):
                entry = self.words[word]
                b, k = entry[1], entry[2]
                b[k] = i & 255
                b[k + 1] = i >> 8
                b[k + 2] = w & 255
                b[k + 3] = w >> 8
                entry[2] = k + 4
                sq += w * w
            self.answers.append(unescape(meta[ANSWER_PREFIX + str(i)]))
            self.norms.append(isqrt(sq))
        for entry in self.words.values():
            del entry[2]
        if not self.answers:
            raise ValueError("meta retrieval: no answer_0")
        self.number = {}
        for i, a in enumerate(self.answers):
            if a not in self.number:
                self.number[a] = i

    def scores(self, question, words=None):
        """Every answer's score for the question (ints, 0..SCALE), in answer order."""
        dots = [0] * len(self.answers)
        sq = 0
        for word in content_words(question) if words is None else words:
            entry = self.words.get(word)
            if entry is None:
                sq += self.unknown * self.unknown
                continue
            q, b = entry
            sq += q * q
            for j in range(0, len(b), 4):
                dots[b[j] | b[j + 1] << 8] += q * (b[j + 2] | b[j + 3] << 8)
        nq = isqrt(sq)
        out = []
        for d, n in zip(dots, self.norms):
            out.append(d * SCALE // (nq * n) if d and nq and n else 0)
        return out

    def choose(self, question, model_answer, abstain=None):
        """The answer to give: model_answer, another corpus answer or abstain (see the rule at
        the top). Returns (answer, how): how is "model" (its answer kept), "retrieved" (another
        corpus answer) or "abstained" (the abstain answer instead of the model's)."""
        words = content_words(question)
        if not words:
            return model_answer, "model"
        scores = self.scores(question, words)
        best = 0
        for i in range(1, len(scores)):
            if scores[i] > scores[best]:
                best = i
        if abstain is not None and model_answer == abstain:
            if scores[best] >= self.override:
                return self.answers[best], "retrieved"
            return abstain, "model"
        mine = self.number.get(model_answer)
        if mine is None:
            pick = best if scores[best] >= self.accept else None
        elif scores[best] - scores[mine] > self.margin:
            pick = best
        else:
            pick = mine
        if abstain is not None and (pick is None or scores[pick] < self.support):
            return abstain, "abstained"
        if pick is None or pick == mine:
            return model_answer, "model"
        return self.answers[pick], "retrieved"
