"""minipeft.data.e2e: the E2E CSV loader (on the real dev set when present), MR parsing and the
LoRA prompt format, splits by MR, and the synthetic generator."""
from __future__ import annotations

from pathlib import Path

import pytest

from minipeft.data.e2e import (
    ATTRIBUTES,
    E2EData,
    format_example,
    format_mr,
    format_prompt,
    load_e2e,
    load_e2e_csv,
    parse_mr,
    parse_prompt,
    split_by_mr,
    synthetic_e2e,
)

DEVSET = Path(__file__).parents[2] / ".." / "shared" / "data" / "e2e" / "devset.csv"


@pytest.fixture(scope="module")
def devset() -> E2EData:
    if not DEVSET.is_file():
        pytest.skip(f"E2E dev set not found at {DEVSET}")
    return load_e2e_csv(DEVSET)


@pytest.fixture(scope="module")
def synthetic() -> E2EData:
    return synthetic_e2e(300, seed=0)


# ---- the real dev set ---------------------------------------------------------------------------
def test_devset_counts(devset):
    assert len(devset) == 547
    assert devset.n_rows == 4672 == len(devset.pairs())
    assert len(set(devset.mrs)) == len(devset)
    assert all(refs and all(r for r in refs) for refs in devset.refs)


def test_devset_first_group(devset):
    assert devset.mrs[0] == "name[Alimentum], area[city centre], familyFriendly[no]"
    assert devset.refs[0][0] == "There is a place in the city centre, Alimentum, that is not family-friendly."
    assert devset.pairs()[0][0] == "name : Alimentum | area : city centre | family friendly : no||"


def test_devset_mrs_parse(devset):
    for mr in devset.mrs:
        items = parse_mr(mr)
        assert "name" in items and set(items) <= set(ATTRIBUTES)
        assert parse_prompt(format_prompt(mr)) == items


@pytest.mark.parametrize("frac", [0.1, 0.25])
def test_devset_split_by_mr(devset, frac):
    train, val = devset.split(frac, seed=0)
    assert len(val) == round(frac * len(devset)) and len(train) + len(val) == len(devset)
    assert not set(train.mrs) & set(val.mrs)  # no MR on both sides
    assert train.n_rows + val.n_rows == devset.n_rows
    again = split_by_mr(devset, frac, seed=0)
    assert again[1].mrs == val.mrs and again[0].mrs == train.mrs  # deterministic
    assert devset.split(frac, seed=1)[1].mrs != val.mrs
    order = {mr: i for i, mr in enumerate(devset.mrs)}
    assert [order[m] for m in val.mrs] == sorted(order[m] for m in val.mrs)  # file order kept


# ---- format --------------------------------------------------------------------------------------
def test_format_mr_and_prompt():
    mr = "name[The Vaults], eatType[pub], priceRange[more than £30], customer rating[5 out of 5], near[Café Adriatic]"
    assert format_mr(mr) == ("name : The Vaults | Type : pub | price : more than £30 | customer rating : 5 out of 5"
                             " | near : Café Adriatic")
    assert format_prompt(mr).endswith(" : Café Adriatic||")
    assert format_example(mr, "The Vaults is a pub.") == format_prompt(mr) + "The Vaults is a pub."
    assert parse_prompt(format_example(mr, "text")) == parse_mr(mr)
    assert format_mr({"name": "X", "familyFriendly": "yes"}) == "name : X | family friendly : yes"


@pytest.mark.parametrize("bad, message", [
    ("", "empty MR"),
    ("name", r"cannot parse MR 'name' at character 0"),
    ("name[X", r"cannot parse MR 'name\[X' at character 0"),
    ("name[X] area[Y]", r"expected ',' at character 8, got 'a'"),
    ("name[X], name[Y]", "gives attribute 'name' twice"),
    ("[X]", r"cannot parse MR '\[X\]' at character 0"),
])
def test_parse_mr_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_mr(bad)


# ---- loader errors -------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="mr,ref"):
        load_e2e_csv(tmp_path / "nope.csv")


def test_wrong_header(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("meaning,text\nname[A],A is here.\n", encoding="utf-8")
    with pytest.raises(ValueError, match="expected columns 'mr' and 'ref'"):
        load_e2e_csv(p)


def test_bad_rows(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text('mr,ref\n"name[A], area[riverside]",A is by the river.,extra\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        load_e2e_csv(p)
    p.write_text('mr,ref\n"name[A], area[riverside]",\n', encoding="utf-8")
    with pytest.raises(ValueError, match="empty ref"):
        load_e2e_csv(p)
    p.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_e2e_csv(p)


def test_groups_columns_any_order_and_fixes_encoding(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text('\ufeffREF,MR\nCheap.,name[A]\nCosts Â£20.,"name[B], priceRange[less than £20]"\n'
                 'A is cheap.,name[A]\n', encoding="utf-8")
    d = load_e2e_csv(p)
    assert d.mrs == ("name[A]", "name[B], priceRange[less than £20]")
    assert d.refs == (("Cheap.", "A is cheap."), ("Costs £20.",))
    with pytest.raises(ValueError, match="at least 2"):
        d.subset([0]).split()
    with pytest.raises(ValueError, match="val_fraction"):
        d.split(1.5)


# ---- synthetic data ------------------------------------------------------------------------------
def test_synthetic_deterministic(synthetic):
    again = synthetic_e2e(300, seed=0)
    assert again.mrs == synthetic.mrs and again.refs == synthetic.refs
    assert synthetic_e2e(300, seed=1).refs != synthetic.refs
    assert load_e2e(None, seed=0, n_mrs=300).refs == synthetic.refs


def test_synthetic_covers_attributes_and_values(synthetic):
    seen = set()
    for mr, refs in zip(synthetic.mrs, synthetic.refs):
        items = parse_mr(mr)  # the loader's parser reads the generator's MRs
        assert parse_prompt(format_prompt(mr)) == items
        assert items and list(items)[0] == "name" and set(items) <= set(ATTRIBUTES)
        assert 3 <= len(items) <= 8 and 2 <= len(refs) <= 8 and len(set(refs)) == len(refs)
        seen |= set(items)
        for ref in refs:
            for attr, value in items.items():
                if attr != "familyFriendly":
                    assert value in ref, (attr, value, ref)  # every value is said
    assert seen == set(ATTRIBUTES)


def test_synthetic_phrasings_vary(synthetic):
    starts = {ref.split(" ")[0] for refs in synthetic.refs for ref in refs}
    assert "There" in starts and len(starts) > 5
    texts = " ".join(r for refs in synthetic.refs for r in refs)
    for phrase in ("family-friendly", "kid friendly", "welcomes children", "for adults only"):
        assert phrase in texts


def test_synthetic_split_and_pairs(synthetic):
    train, val = synthetic.split(0.2, seed=3)
    assert not set(train.mrs) & set(val.mrs) and len(val) == 60
    prompt, ref = train.pairs()[0]
    assert prompt.endswith("||") and ref and prompt == train.prompts()[0]


def test_synthetic_bad_args():
    with pytest.raises(ValueError, match="n_mrs must be a positive int, got 0"):
        synthetic_e2e(0)
    with pytest.raises(ValueError, match=r"refs_per_mr must be \(min, max\) with 1 <= min <= max"):
        synthetic_e2e(5, refs_per_mr=(3, 2))
