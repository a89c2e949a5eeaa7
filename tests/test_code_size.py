"""Keep the code small: no function in pipeline/ longer than 60 lines or with more than 8 parameters, unless its
docstring says why ("Why so long" or "why so many parameters", in any case)."""
import ast

from tests.conftest import ROOT

LINES, PARAMETERS = 60, 8


def oversized() -> list[str]:
    out = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = (ast.get_docstring(node) or "").lower()
            args = node.args
            n_params = len([a for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)
                            if a.arg not in ("self", "cls")])
            where = f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
            length = node.end_lineno - node.lineno + 1
            if length > LINES and "why so long" not in doc:
                out.append(f"{where}: {length} lines")
            if n_params > PARAMETERS and "why so many parameters" not in doc:
                out.append(f"{where}: {n_params} parameters")
    return out


def test_functions_are_short_and_take_few_parameters():
    assert not oversized(), "\n".join(oversized())
