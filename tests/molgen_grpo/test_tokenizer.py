"""Tokenizers (spec §1.3): lossless enriched text, tag ids, save/load, unseen atoms, stop tokens, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("rdkit")
pytest.importorskip("transformers")

from rdkit import Chem  # noqa: E402
from rdkit.Chem import AllChem  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from elign.engine.errors import ConfigError  # noqa: E402
from molgen_grpo.text import encode  # noqa: E402
from molgen_grpo.tokenizer import (  # noqa: E402
    ASSET_PATH,
    COMMON_ATOMS,
    EOS_TOKEN,
    TAGS,
    atom_tokens,
    build_tokenizer,
    load_tokenizer,
    resolve_path,
    stop_token_ids,
)

# Ring, branch, stereo, charges, aromatic [nH], Cl/Br, isotope, two fragments, a double-bond E.
MOLECULES = ("CCO", "O=C(O)c1ccccc1", "C[C@H]([NH3+])C(=O)[O-]", "c1ccc2[nH]ccc2c1", "ClC(Br)F",
             "[13CH3]Oc1ccccc1", "C[NH+](C)C.[Cl-]", "C/C=C/C(=O)O", "O=C1CCCN1")


def embed(smiles: str) -> Chem.Mol:
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = 0
    assert AllChem.EmbedMolecule(mol, params) == 0, smiles
    return mol


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ASSET_PATH)


@pytest.fixture(scope="module")
def units() -> list[str]:
    out = []
    for smiles in MOLECULES:
        canonical, enriched = encode(embed(smiles))
        out.append(f"[SMILES]{canonical}[/SMILES][CONFORMER]{enriched}[/CONFORMER]{EOS_TOKEN}")
    return out


def test_enriched_units_round_trip_exactly(tokenizer, units):
    for text in units:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        # the pad/eos is special and skipped; the tags are ordinary tokens and stay
        assert tokenizer.decode(ids, skip_special_tokens=True) == text.removesuffix(EOS_TOKEN)


def test_atoms_and_tags_are_single_tokens_with_documented_ids(tokenizer, units):
    assert [tokenizer.convert_tokens_to_ids(t) for t in TAGS] == [1, 2, 3, 4]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 0
    assert tokenizer.padding_side == "left"
    for tag in TAGS:
        assert tokenizer.encode(tag, add_special_tokens=False) == [TAGS.index(tag) + 1]
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode(units[2], add_special_tokens=False))
    # alanine zwitterion: canonical C[C@H]([NH3+])C(=O)[O-]; each atom token is whole, digits are single
    for atom in ("[C]", "[C@H]", "[NH3+]", "[O-]", "[O]"):
        assert atom in tokens
    assert all(len(t) == 1 for t in tokens if t[0] in "0123456789-.,<>" and t != EOS_TOKEN)
    # a coordinate block <x,y,z> of 4-decimal values: 1 + 3 * (1 + 1 + 4 (+ 1 sign)) + 2 + 1 tokens
    block = units[0][units[0].index("<"):units[0].index(">") + 1]
    signs = block.count("-")
    assert len(tokenizer.encode(block, add_special_tokens=False)) == 1 + 3 * 6 + signs + 2 + 1


def test_unseen_bracket_atom_falls_back_to_characters(tokenizer):
    text = "[CONFORMER][Xe]<1.0000,-2.5000,0.0000>[Au+3]<0.0000,0.0000,0.0000>[/CONFORMER]"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(ids)[1:5] == ["[", "X", "e", "]"]


def test_shipped_asset_is_the_built_tokenizer(tokenizer):
    # QM9 adds no atom beyond COMMON_ATOMS, so the README's command rebuilds exactly this vocabulary.
    built = build_tokenizer(COMMON_ATOMS)
    assert built.get_vocab() == tokenizer.get_vocab()
    assert Path(resolve_path(ASSET_PATH), "README.md").is_file()


def test_save_and_load_round_trip(tmp_path, units):
    built = build_tokenizer(COMMON_ATOMS, padding_side="right")
    built.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.padding_side == "right"
    assert loaded.get_vocab() == built.get_vocab()
    for text in units:
        assert loaded.encode(text, add_special_tokens=False) == built.encode(text, add_special_tokens=False)
    batch = loaded(["[SMILES]C[/SMILES]", "[SMILES]CCO[/SMILES]"], padding=True, add_special_tokens=False)
    assert batch["input_ids"][0] == [1, loaded.convert_tokens_to_ids("C"), 3, 0, 0]
    via_loader = load_tokenizer(str(tmp_path))  # tags present: ids unchanged, padding side forced left
    assert via_loader.padding_side == "left" and len(via_loader) == len(built)


def test_atom_tokens_are_the_encoders(tmp_path):
    # bare atoms wrapped, bracket atoms copied, an H-less radical [C] spelled [CH0]; bad SMILES skipped
    assert atom_tokens(["C[NH3+]", "c1cc[nH]c1", "[C]C", "not a smiles", ""]) == \
        ["[CH0]", "[C]", "[NH3+]", "[c]", "[nH]"]


def test_load_tokenizer_appends_missing_tags_in_order(tmp_path):
    # A Qwen-like tokenizer without the tags: they are appended at the end, in 3DMolGen's order.
    vocab = {EOS_TOKEN: 0, "a": 1, "b": 2}
    core = Tokenizer(models.WordLevel(vocab, unk_token=EOS_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token=EOS_TOKEN, eos_token=EOS_TOKEN).save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path), padding_side="right")
    assert [tokenizer.convert_tokens_to_ids(t) for t in TAGS] == [3, 4, 5, 6]
    assert tokenizer.encode("[SMILES]ab[/SMILES]", add_special_tokens=False) == [3, 1, 2, 5]
    assert tokenizer.decode([4, 1, 6], skip_special_tokens=True) == "[CONFORMER]a[/CONFORMER]"


def test_load_tokenizer_without_pad_token_is_refused(tmp_path):
    core = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>").save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="pad token"):
        load_tokenizer(str(tmp_path))


def test_load_tokenizer_errors_name_the_key(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no 45 s of retries
    for missing in ("no-such-org/no-such-tokenizer", str(tmp_path / "missing")):
        with pytest.raises(ConfigError, match="path=.*pass a local tokenizer directory"):
            load_tokenizer(missing)
    with pytest.raises(ConfigError, match="padding_side"):
        load_tokenizer(ASSET_PATH, padding_side="middle")


def test_stop_token_ids(tokenizer):
    assert stop_token_ids(tokenizer, ["[/CONFORMER]", EOS_TOKEN]) == [4, 0]
    assert stop_token_ids(tokenizer, ["[C@@H]"]) == [tokenizer.convert_tokens_to_ids("[C@@H]")]
    with pytest.raises(ConfigError, match=r"stop_tokens='\[/CONFORMER\]<'.*2 tokens"):
        stop_token_ids(tokenizer, ["[/CONFORMER]<"])
    for empty in ([], "[/CONFORMER]"):
        with pytest.raises(ConfigError, match="non-empty list"):
            stop_token_ids(tokenizer, empty)


def test_build_tokenizer_rejects_bad_atoms():
    with pytest.raises(ConfigError, match="atoms"):
        build_tokenizer(["Cl"])  # not bracketed
    with pytest.raises(ConfigError, match="atoms"):
        build_tokenizer(["[SMILES]"])


def test_cli_writes_a_loadable_directory(tmp_path, capsys):
    from molgen_grpo.tokenizer import main

    corpus = tmp_path / "smiles.txt"
    corpus.write_text("F[Xe]F\nCCO\n")  # [Xe] is not in COMMON_ATOMS
    assert main(["--out", str(tmp_path / "tok"), "--smiles", str(corpus)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tags"] == {"[SMILES]": 1, "[CONFORMER]": 2, "[/SMILES]": 3, "[/CONFORMER]": 4}
    assert summary["atoms"] == len(set(COMMON_ATOMS)) + 1
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert len(loaded.encode("[Xe]", add_special_tokens=False)) == 1
