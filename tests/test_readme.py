"""The README's drop-in example runs as written."""
import re
from pathlib import Path


def test_readme_example_runs():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    scope = {}
    exec(compile(code.replace("224", "64"), "README.md", "exec"), scope)  # smaller images, same code
    assert scope["logits"].shape == (4, 2)
