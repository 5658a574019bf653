import pytest

from attnkit.tools.corpus import corpus_text, corpus_tokens


def test_corpus_is_the_pydoc_topics_text():
    text = corpus_text()
    assert len(text) > 400_000
    assert text.startswith('The "assert" statement')  # topics["assert"] sorts first


def test_corpus_tokens_are_the_first_tokens_of_the_whole(smollm2):
    _, tokenizer = smollm2
    head = corpus_tokens(tokenizer, 300)
    assert head.shape == (300,)
    assert tokenizer.decode(head) == corpus_text()[: len(tokenizer.decode(head))]


def test_corpus_tokens_reject_more_than_there_is(smollm2):
    _, tokenizer = smollm2
    with pytest.raises(ValueError, match="n_tokens=10000000 is more than the corpus holds"):
        corpus_tokens(tokenizer, 10_000_000)
