"""The docs' numbers are the committed results' (train/update_docs.py): every marked number,
claim and generated table of README.md and docs/ is what its JSON source says, so a result
rerun without `python -m train.update_docs` fails here; and the checker finds a stale
number, a broken claim and a stale table."""

import json
import os

import pytest

from train import update_docs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_marked_number_claim_and_table_is_up_to_date():
  changed, problems = update_docs.stale()
  assert not problems, "\n".join(problems)
  assert not changed, ("stale (run python -m train.update_docs): "
                       + ", ".join(sorted(changed)))


def test_the_docs_with_results_mark_their_numbers():
  """The pages whose prose quotes committed results carry markers (a page that lost them
  would pass the check above by checking nothing)."""
  expected = {"docs/results.md": 100, "docs/hypernet.md": 20, "docs/personalize.md": 10,
              "README.md": 2}
  for path, least in expected.items():
    with open(os.path.join(REPO, path)) as f:
      text = f.read()
    assert len(update_docs.NUMBER.findall(text)) >= least, path


def test_a_stale_number_a_broken_claim_and_a_stale_table_are_found():
  with open(os.path.join(REPO, "docs", "mini_results.json")) as f:
    full = json.load(f)["table"]["full"]
  head = "<!-- numbers: t=docs/mini_results.json:table -->\n"
  text = (head + "plain 0.999<!--=t.full.identity_plain-->, gain +1.0<!--=t.full.identity_plain_gain-->,"
          " drop -9<!--=-100 * t.full.background_drop-->, range 0.1-0.2<!--=t.full.identity-->"
          "<!--? t.full.identity_plain < t.base.identity_plain -->")
  new, problems = update_docs.render(text, "x.md")
  assert f"plain {full['identity_plain']:.3f}<!--=" in new          # decimals kept
  assert f"gain {full['identity_plain_gain']:+.1f}<!--=" in new     # sign kept
  assert f"drop {-100 * full['background_drop']:+.0f}<!--=" in new
  assert f"range 0.1-{full['identity']:.1f}<!--=" in new            # a range is not a sign
  assert len(problems) == 1 and "x.md:2: claim does not hold" in problems[0]
  again, _ = update_docs.render(new, "x.md")
  assert again == new                                                # rewriting is stable

  table = "<!-- table: docs/mini_results_table.md -->\n| old |\n<!-- end table -->\n"
  rendered, _ = update_docs.render(table, "y.md")
  assert "| old |" not in rendered and "| full | 50 |" in rendered
  with pytest.raises(ValueError, match="z.md:2: cannot evaluate 't.nothing'"):
    update_docs.render(head + "1.0<!--=t.nothing-->", "z.md")
