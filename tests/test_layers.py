"""The package's layers, as its docstring lists them: a module imports only from its own layer and the layers below,
the modules import each other without a cycle, and the package's own modules are imported at the top of a module
(a function-level import would hide an arrow from this check and from a reader), except the few listed here with
their reason."""
import ast
import pathlib

import iblip_jax

PACKAGE = pathlib.Path(iblip_jax.__file__).parent

# Bottom to top; a module belongs to the first layer with a prefix of its dotted name.
LAYERS = [
    ("errors", "extras", "prompts", "chips"),
    ("losses",),
    ("models",),
    ("trainable", "lora", "optim", "sharding", "distributed"),
    ("hf",),
    ("train_step", "train_state", "checkpoints", "step_flops"),
    ("sampling", "decoding", "ranking"),
    ("data",),
    ("attention_maps",),
    ("engine", "slots"),
    ("evaluation",),
    ("run", "config_lib", "main"),
    ("demo",),
    ("inference", "serve", "serve_api", "lmms_eval_model"),
    ("aot",),
]
# Function-level imports of the package's own modules, each with why it cannot be at the top.
LAZY = {}


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    if name:
      out[name] = path
  return out


def _layer(name: str) -> int:
  for i, prefixes in enumerate(LAYERS):
    if any(name == p or name.startswith(p + ".") for p in prefixes):
      return i
  raise AssertionError(f"iblip_jax.{name} is in no layer: add it to LAYERS (and to the package docstring)")


def _imports(path: pathlib.Path, known: set[str]) -> list[tuple[str, int, bool]]:
  """(imported module, line, at module level) for every import of the package's own modules."""
  tree = ast.parse(path.read_text())
  top = {id(n) for n in tree.body}
  out = []
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "iblip_jax" \
        and node.level == 0:
      base = node.module.removeprefix("iblip_jax").lstrip(".")
      for alias in node.names:   # `from iblip_jax.x import y`: y may be a module or a name in x
        sub = f"{base}.{alias.name}".lstrip(".")
        names.append(sub if sub in known else base)
    elif isinstance(node, ast.Import):
      names = [a.name.removeprefix("iblip_jax").lstrip(".") for a in node.names if a.name.split(".")[0] == "iblip_jax"]
    out += [(n, node.lineno, id(node) in top) for n in names if n]
  return out


def test_no_module_imports_from_a_layer_above_it():
  modules = _modules()
  upward = []
  for name, path in modules.items():
    for target, line, _ in _imports(path, set(modules)):
      if _layer(target) > _layer(name):
        upward.append(f"iblip_jax/{path.relative_to(PACKAGE)}:{line}: {name} (layer {_layer(name)}) imports "
                      f"{target} (layer {_layer(target)})")
  assert not upward, "\n".join(upward)


def test_no_function_level_imports_of_the_package():
  modules = _modules()
  hidden = [f"iblip_jax/{path.relative_to(PACKAGE)}:{line}: imports {target}"
            for name, path in modules.items() for target, line, at_top in _imports(path, set(modules))
            if not at_top and (name, target) not in LAZY]
  assert not hidden, "\n".join(hidden)


def test_no_import_cycles():
  modules = _modules()
  graph = {name: {t for t, _, _ in _imports(path, set(modules)) if t != name} for name, path in modules.items()}
  # a package imports its own submodules in its __init__: that is not a cycle back into it
  graph = {n: {t for t in ts if not n.startswith(t + ".")} for n, ts in graph.items()}
  state, cycles = {}, []

  def visit(n, stack):
    state[n] = "open"
    for t in sorted(graph.get(n, ())):
      if state.get(t) == "open":
        cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
      elif t not in state:
        visit(t, stack + [t])
    state[n] = "done"
  for n in sorted(graph):
    if n not in state:
      visit(n, [n])
  assert not cycles, "\n".join(cycles)
