"""idkm_plugin.workloads.text: docstring sentences of a source tree and the fixed held-out split."""
from idkm_plugin.workloads.text import split, stdlib_sentences


def test_docstring_sentences_from_a_source_tree(tmp_path):
    (tmp_path / "mod.py").write_text('"""Module docstring. Too short.\n\nThis module returns the value of every '
                                     'function it is given.\n\n>>> f() is None and this is a doctest line."""\n'
                                     'def f():\n    """Return the name of the file that is opened when asked."""\n')
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_text('"""This docstring is in a test folder and is skipped entirely."""\n')
    (tmp_path / "broken.py").write_text("def (:\n")
    assert stdlib_sentences(str(tmp_path)) == ["Return the name of the file that is opened when asked.",
                                               "This module returns the value of every function it is given."]


def test_split_is_fixed_by_the_sentences_not_their_order():
    sentences = [f"Sentence number {i} of the list." for i in range(50)]
    train, test = split(sentences, 10)
    train2, test2 = split(sentences[::-1], 10)
    assert test == test2 and train == train2 and len(test) == 10 and not set(train) & set(test)
    assert sorted(train + test) == sorted(sentences)
