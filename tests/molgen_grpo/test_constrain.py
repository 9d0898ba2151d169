"""Constrained decoding grammar, driven by hand and by random scores (no model)."""

from __future__ import annotations

import pytest

pytest.importorskip("rdkit")
pytest.importorskip("transformers")

import torch  # noqa: E402
from rdkit import Chem  # noqa: E402

from molgen_grpo.constrain import (  # noqa: E402
    NUMBER,
    ConformerLogitsProcessor,
    CoordinateAlphabet,
    conformer_template,
    prompt_smiles,
)
from molgen_grpo.text import decode, same_graph  # noqa: E402
from molgen_grpo.tokenizer import ASSET_PATH, load_tokenizer  # noqa: E402

# A ring and a branch, charges and stereo, two fragments, an unseen-atom fallback ([Xe] is several tokens).
MOLECULES = ("CCO", "O=C(O)c1ccccc1", "C[C@H]([NH3+])C(=O)[O-]", "C1CC1.O", "F[Xe]F")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ASSET_PATH)


@pytest.fixture(scope="module")
def alphabet(tokenizer):
    return CoordinateAlphabet(tokenizer)


def ids(tokenizer, *tokens):
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def test_prompt_smiles():
    assert prompt_smiles("[SMILES]C[C@H](N)O[/SMILES]") == "C[C@H](N)O"
    with pytest.raises(ValueError, match=r"\[SMILES\]<smiles>\[/SMILES\]"):
        prompt_smiles("CCO")


def test_template_of_acetic_acid_by_hand(tokenizer, alphabet):
    # canonical CC(=O)O -> [C]<>[C]<>(=[O]<>)[O]<> ; the end is [/CONFORMER] then <|endoftext|>
    template = conformer_template("OC(C)=O", tokenizer, alphabet, end=[4, 0])
    block = [alphabet.open, NUMBER, alphabet.comma, NUMBER, alphabet.comma, NUMBER, alphabet.close]
    c, o = ids(tokenizer, "[C]", "[O]")
    expected = [2, c, *block, c, *block, *ids(tokenizer, "(", "="), o, *block, *ids(tokenizer, ")"), o, *block, 4, 0]
    assert template == expected


def test_template_of_unparsable_smiles_is_refused(tokenizer, alphabet):
    with pytest.raises(ValueError, match="cannot parse"):
        conformer_template("C1CC", tokenizer, alphabet, end=[4])


def step(processor, history, vocab):
    """Call the processor on ``history`` (one row); return the allowed token ids."""
    scores = processor(torch.tensor([history]), torch.zeros(1, vocab))
    return set(torch.nonzero(scores[0] > float("-inf")).flatten().tolist())


def test_number_grammar_by_hand(tokenizer, alphabet):
    digits, (minus, dot, comma) = set(alphabet.digits), (alphabet.minus, alphabet.dot, alphabet.comma)
    one, zero, two = alphabet.digits[1], alphabet.digits[0], alphabet.digits[2]
    template = conformer_template("C", tokenizer, alphabet, end=[4])  # [CONFORMER][C]<x,y,z>[/CONFORMER]
    processor = ConformerLogitsProcessor([template], alphabet, precision=2, max_integer_digits=2, pad_id=0)
    vocab = len(tokenizer)
    history = [1, 41, 3]  # the prompt: any tokens; only generated ones advance the cursor
    expected = [  # (token generated, allowed before it)
        (2, {2}), (template[1], {template[1]}), (alphabet.open, {alphabet.open}),
        (minus, digits | {minus}), (one, digits), (two, digits | {dot}), (dot, {dot}),  # "-12." (cap 2 digits)
        (zero, digits), (zero, digits), (comma, {comma}),  # "00" then ','
        (zero, digits | {minus}), (dot, {dot}), (one, digits), (one, digits), (comma, {comma}),  # "0.11": no "01"
        (two, digits | {minus}), (dot, digits | {dot}), (zero, digits), (zero, digits),  # "2.00"
        (alphabet.close, {alphabet.close}), (4, {4}),
    ]
    for token, allowed in expected:
        assert step(processor, history, vocab) == allowed
        history.append(token)
    assert step(processor, history, vocab) == {0}  # template complete: only the pad
    forced = torch.stack(processor.forced, dim=1)[0].tolist()
    assert forced == [len(a) == 1 for _, a in expected] + [True]
    text = tokenizer.decode(history[3:])
    assert text == "[CONFORMER][C]<-12.00,0.11,2.00>[/CONFORMER]"


def test_a_disallowed_token_is_an_error(tokenizer, alphabet):
    template = conformer_template("C", tokenizer, alphabet, end=[4])
    processor = ConformerLogitsProcessor([template], alphabet, precision=4, max_integer_digits=3, pad_id=0)
    vocab = len(tokenizer)
    step(processor, [1], vocab)
    with pytest.raises(RuntimeError, match="did not allow"):
        step(processor, [1, 4], vocab)  # [/CONFORMER] where [CONFORMER] is forced


def test_random_walks_decode_to_the_prompt_graph(tokenizer, alphabet):
    """Any path the mask allows is a valid enriched string of the prompt's molecule (batched rows)."""
    generator = torch.Generator().manual_seed(0)
    rows = [m for m in MOLECULES for _ in range(3)]
    templates = [conformer_template(m, tokenizer, alphabet, end=[4, 0]) for m in rows]
    processor = ConformerLogitsProcessor(templates, alphabet, precision=4, max_integer_digits=3, pad_id=0)
    history = torch.zeros(len(rows), 2, dtype=torch.long)  # left-padded "prompt"
    for _ in range(max(map(len, templates)) + 40 * 3 * 10):
        scores = processor(history, torch.randn(len(rows), len(tokenizer), generator=generator))
        token = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)
        history = torch.cat([history, token], dim=1)
        if all(c.done for c in processor.cursors):
            break
    assert all(c.done for c in processor.cursors)
    for smiles, row in zip(rows, history[:, 2:].tolist()):
        text = tokenizer.decode(row, skip_special_tokens=True)
        assert text.startswith("[CONFORMER]") and text.endswith("[/CONFORMER]")
        mol = decode(text.removeprefix("[CONFORMER]").removesuffix("[/CONFORMER]"))
        assert same_graph(Chem.MolToSmiles(mol), smiles)
        assert (abs(mol.GetConformer().GetPositions()) < 1000).all()


def test_alphabet_needs_single_character_tokens(tokenizer):
    class NoDigits:
        def encode(self, text, add_special_tokens=False):
            return [1, 2] if text == "7" else [ord(text)]

    with pytest.raises(ValueError, match="'7' to be one token"):
        CoordinateAlphabet(NoDigits())
    with pytest.raises(ValueError, match=">= 1"):
        ConformerLogitsProcessor([], CoordinateAlphabet(tokenizer), precision=0, max_integer_digits=3, pad_id=0)
