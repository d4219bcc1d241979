"""Executes every ```python block of README.md, in order, each in a fresh namespace.

A block directly below an HTML comment ``<!-- not-run: reason -->`` is skipped with that reason.
"""

import pathlib
import re
from typing import NamedTuple, Optional

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(?P<reason>\S.*?)\s*-->")


class Block(NamedTuple):
  """A ```python block: its first code line (1-based), code, and why it is not run (or None)."""
  line: int
  code: str
  not_run: Optional[str]


def readme_blocks(text: str) -> list[Block]:
  """The ```python blocks of a Markdown text, in order."""
  lines = text.splitlines()
  blocks, i = [], 0
  while i < len(lines):
    if lines[i].strip() == "```python":
      end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
      above = NOT_RUN.fullmatch(lines[i - 1].strip()) if i else None
      blocks.append(Block(i + 2, "\n".join(lines[i + 1:end]) + "\n",
                          above.group("reason") if above else None))
      i = end
    i += 1
  return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def test_readme_blocks_parse_and_not_run_marks_sit_above_a_block():
  text = README.read_text(encoding="utf-8")
  assert BLOCKS and any(b.not_run is None for b in BLOCKS)
  assert len(NOT_RUN.findall(text)) == sum(b.not_run is not None for b in BLOCKS)


def test_readme_blocks_parser_on_a_small_text():
  text = ("a\n```python\nx = 1\n```\n<!-- not-run: slow -->\n```python\ny = 2\n```\n"
          "```bash\nls\n```\n")
  assert readme_blocks(text) == [Block(3, "x = 1\n", None), Block(7, "y = 2\n", "slow")]


@pytest.mark.parametrize(
    "block", [pytest.param(b, id=f"README.md:{b.line}",
                           marks=[pytest.mark.skip(reason=b.not_run)] if b.not_run else [])
              for b in BLOCKS])
def test_readme_block_runs(block: Block):
  exec(compile(block.code, f"README.md:{block.line}", "exec"),  # pylint: disable=exec-used
       {"__name__": "__readme__"})
