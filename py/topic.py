# topic.py: is a question about anything the corpus talks about? One file for MicroPython and
# CPython (chat.py on the board, tinygpt train / convert / eval on the PC import the same code).
#
# The model file's meta section may hold `known_words`: the content words of the training corpus
# (questions, answers, prose), space-separated, sorted. A question none of whose content words is
# among them is about something else ("who wrote war and peace", "zzzzzz", "!!!") and gets the
# abstain answer before the model runs. A question with a known word goes to the model, which was
# trained to abstain too. Measured (docs/recipes.md): this check alone refuses 1 of 300 reworded
# in-domain questions and catches 118 of 200 off-topic ones on a plant-care corpus.

# Words too common to say what a question is about ("how do i ... ?").
COMMON_WORDS = set("""
a about after all also am an and any anyone are as at be been before best better between but by can
could did do does doing don't else ever every for from get gets getting give go going good got had has
have how i i'm if in into is isn't it it's its just know like long make many me more most much my need
new no not now of off on one or other our out over please really right should so some something still
tell than thank thanks that that's the their them then there these they thing things this those to too
up us use used using very want was way we well were what what's whats when where which who why will
with without work would yes you your
""".split())


def _is_word_char(c):
    return "a" <= c <= "z" or "0" <= c <= "9" or c == "'"


def content_words(text):
    """The words of text that are not COMMON_WORDS: runs of ASCII letters, digits and "'",
    lowercased (only A-Z: the same on MicroPython, whose str.lower() knows only ASCII), "'" at
    either end and a final "'s" dropped, and a trailing "s" dropped from words longer than 3 letters that do not
    end in "ss" ("plants" -> "plant")."""
    out = set()
    word = []
    for c in text + " ":
        if "A" <= c <= "Z":
            c = chr(ord(c) + 32)
        if _is_word_char(c):
            word.append(c)
            continue
        if word:
            w = "".join(word).strip("'")
            word = []
            if w not in COMMON_WORDS and w[-2:] == "'s":  # "plant's" -> "plant" ("it's" is common)
                w = w[:-2]
            if w and w not in COMMON_WORDS:
                if len(w) > 3 and w[-1] == "s" and w[-2] != "s":
                    w = w[:-1]
                out.add(w)
    return out


def known_words_line(texts):
    """The meta value of `known_words` for the corpus texts: their content words, sorted, one
    space between (and none at the ends)."""
    words = set()
    for t in texts:
        words |= content_words(t)
    return " ".join(sorted(words))


def off_topic(question, known):
    """True when none of the question's content words is in known (a known_words value).
    A question with no content word at all ("how are you?") is not off-topic by this test: the
    model decides."""
    words = content_words(question)
    if not words or not known:
        return False
    for w in words:
        if _has_word(known, w):
            return False
    return True


def _has_word(known, w):
    """w is one of the space-separated words of known. Searched in place: " " + known + " " would
    copy the whole list (17 KB for the shipped corpus) at every question, and a fragmented board
    heap may have no such block free."""
    n, end = len(w), len(known)
    i = known.find(w)
    while i >= 0:
        if (i == 0 or known[i - 1] == " ") and (i + n == end or known[i + n] == " "):
            return True
        i = known.find(w, i + 1)
    return False
