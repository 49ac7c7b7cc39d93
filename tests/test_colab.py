"""Every chapter and lab has an up-to-date .ipynb copy that Colab can open."""

import json

import jupytext

from tools import colab
from tools.notebooks import notebooks


def test_every_notebook_has_a_fresh_colab_copy():
    stale = colab.stale(notebooks())
    assert not stale, f"stale or missing Colab copies (run `make notebooks`): {stale}"


def test_copy_is_the_notebook_after_a_bootstrap_cell_with_the_configured_url():
    url = colab.repository_url()
    for source in notebooks():
        copy = json.loads(colab.twin(source).read_text())
        first = "".join(copy["cells"][0]["source"])
        assert url in first and "google.colab" in first
        assert f"/content/llmcore/{source.parent.name}" in first
        code = [c.source for c in jupytext.read(source).cells if c.cell_type == "code"]
        copied = ["".join(c["source"]) for c in copy["cells"][1:]
                  if c["cell_type"] == "code"]
        assert copied == code, source
