"""Re-run the tutorial notebooks in place and store their outputs (``make notebooks``).

Error tracebacks keep the files they went through; the checkout's own path is
replaced by ``<dragon-nb>`` so no machine's paths are committed.
"""
import os
import subprocess
import sys

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main(names):
    for name in names or sorted(n for n in os.listdir(HERE) if n.endswith(".ipynb")):
        path = os.path.join(HERE, os.path.basename(name))
        subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook",
                        "--execute", "--inplace", path], check=True)
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            for out in cell.get("outputs", []):
                if "traceback" in out:
                    out["traceback"] = [t.replace(ROOT, "<dragon-nb>") for t in out["traceback"]]
                if "text" in out:
                    out["text"] = out["text"].replace(ROOT, "<dragon-nb>")
        nbformat.write(nb, path)


if __name__ == "__main__":
    main(sys.argv[1:])
