#!/usr/bin/env bash
# Mutation testing of the core with mutmut 3 (pip install mutmut), in a scratch copy of the repository.
#
#   tools/mutation.sh [run|rerun|results|summary] [--sample N] [--names FILE] [--tests FILES...]
#
# What is mutated (mutmut mutates function bodies; module-level tables are not mutated):
#   cds/pathway.py     everything (care step, urgency, escalation, status, guard)
#   cds/conditions.py  the parser and the three-valued evaluator (describe(), the wording, is left out)
#   cds/scores.py      everything (derived facts)
#   cds/engine.py      the compile part only: condition -> T/F formulas, splitting, packing, the alpha-tree
#                      mirror and width bound, field names and the ruleset JSON (not the encoder or the
#                      C-engine driver)
# Against: tests/test_conditions.py tests/test_scores.py tests/test_vignettes.py tests/test_red_flag_boundaries.py
# tests/test_invariants.py tests/test_engine.py (plus tests/test_mutation_killers.py when it exists, unless
# --tests is given), with HYPOTHESIS_PROFILE=dev and -x. mutmut runs, for each mutant, the tests that
# called the mutated function in its stats run.
#
# The copy (default /tmp/cds-mutation, or $MUTATION_WORKDIR) gets a setup.cfg [mutmut] section; the
# repository is not touched. Each mutant runs in a child of a fork server that has imported the third-party
# modules only (forkserver_warmup=import), so every mutant loads and compiles the ruleset afresh, under
# the mutant: mutants in the parser and in compile_predicate (which run when a ruleset is loaded) are
# really exercised, not served from a ruleset compiled before the fork.
#
# --sample N runs a deterministic sample of N mutants (every k-th of the sorted names) instead of all.
#   In scope: 3,106 mutants (pathway 568, conditions 703, scores 529, engine compile 1,306); survivors cost a
#   whole clinical run each, so a full run takes many hours on two shared cores: the hardening figures come
#   from --sample 320 (about every tenth).
# --names FILE runs exactly the mutants named in FILE (one a line), e.g. the survivors of an earlier run.
# MUTATION_SOURCE=DIR takes cds/ and tests/ from DIR (a snapshot of an earlier run's tree, so mutant names
# stay the same while cds/ moves on) and adds tests/test_mutation_killers.py from this repository.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-/work/venv/bin/python}"
WORK="${MUTATION_WORKDIR:-/tmp/cds-mutation}"
MAX_CHILDREN="${MUTATION_JOBS:-2}"
CMD="${1:-run}"; shift || true
SAMPLE=""
NAMES_FILE=""
TESTS=(tests/test_conditions.py tests/test_scores.py tests/test_vignettes.py tests/test_red_flag_boundaries.py
       tests/test_invariants.py tests/test_engine.py)
[[ -f "$HERE/tests/test_mutation_killers.py" ]] && TESTS+=(tests/test_mutation_killers.py)
while [[ $# -gt 0 ]]; do
  case "$1" in
    --sample) SAMPLE="$2"; shift 2 ;;
    --names) NAMES_FILE="$(realpath "$2")"; shift 2 ;;
    --tests) shift; TESTS=(); while [[ $# -gt 0 && "$1" != --* ]]; do TESTS+=("$1"); shift; done ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

# the functions of cds/engine.py that make up "compile" (mutant names are cds.engine.x_<name>__mutmut_N,
# methods cds.engine.xǁ<Class>ǁ<name>__mutmut_N)
ENGINE_COMPILE=(x__atom x__all x__any x__compounds x__fields x__test x__build x__add_piece x__undo x__candidates
  x__number_candidates x__simultaneous x__width x__split x__piece_fits x__field_names x__value_json x__expr_json
  x__ruleset_json "xǁ_FactSpecǁ" "xǁ_Helperǁ" "xǁ_Translatorǁ" "xǁ_Partǁ" "xǁNetworkǁcompile")

setup() {
  rm -rf "$WORK"
  mkdir -p "$WORK"
  (cd "${MUTATION_SOURCE:-$HERE}" && tar --exclude=__pycache__ --exclude=.hypothesis -cf - cds tests rulesets schemas \
      examples benchmarks pyproject.toml) | (cd "$WORK" && tar -xf -)
  if [[ -n "${MUTATION_SOURCE:-}" && -f "$HERE/tests/test_mutation_killers.py" ]]; then
    cp "$HERE/tests/test_mutation_killers.py" "$WORK/tests/"   # the new tests, over an earlier snapshot
  fi
  printf '%s\n' hypothesis jsonschema yaml attrs durable_rules_engine referencing pytest _pytest.python \
      > "$WORK/preload.txt"
  {
    echo "[mutmut]"
    echo "source_paths=cds/"
    printf 'only_mutate=\n  cds/pathway.py\n  cds/conditions.py\n  cds/scores.py\n  cds/engine.py\n'
    printf 'also_copy=\n  rulesets/\n  schemas/\n  examples/\n  benchmarks/\n'
    printf 'pytest_add_cli_args_test_selection=\n'; printf '  %s\n' "${TESTS[@]}"
    printf 'pytest_add_cli_args=\n  -p\n  no:cacheprovider\n  -o\n  addopts=\n  -m\n  not slow\n  -W\n  ignore\n'
    echo "process_isolation=forkserver"
    echo "forkserver_warmup=import"
    echo "preload_modules_file=$WORK/preload.txt"
    echo "use_git_change_detection=false"
    echo "timeout_multiplier=5.0"
    echo "timeout_constant=30.0"
  } > "$WORK/setup.cfg"
}

# mutant names to run: every mutant of pathway/conditions (but describe)/scores, the compile part of engine
select_names() {
  "$PY" - "$WORK" "$SAMPLE" "${ENGINE_COMPILE[@]}" <<'EOF'
import json, sys
from pathlib import Path
work, sample, engine_compile = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
names = []
for meta in sorted((work / "mutants" / "cds").glob("*.py.meta")):
    module = "cds." + meta.name[:-len(".py.meta")]
    for key in json.loads(meta.read_text())["exit_code_by_key"]:
        local = key[len(module) + 1:]
        if module == "cds.conditions" and local.startswith("x_describe__mutmut_"):
            continue
        if module == "cds.engine" and not any(local.startswith(p + ("" if p.endswith("ǁ") else "__mutmut_"))
                                              or (p.endswith("compile") and local.startswith(p + "__mutmut_"))
                                              for p in engine_compile):
            continue
        names.append(key)
names.sort()
if sample and int(sample) < len(names):
    step = len(names) / int(sample)
    names = [names[int(i * step)] for i in range(int(sample))]
print("\n".join(names))
EOF
}

# mutmut attributes a function to the tests during which it ran. The shipped ruleset is parsed and
# compiled (cds.conditions.parse/compile_predicate, cds.engine's compile) once, when the first test module
# imports it, and test_vignettes evaluates every vignette in a module-scoped fixture, so those calls are
# credited to one test only and a mutant there would be run against one test. Every evaluation depends
# on them, so: functions that run when a ruleset is compiled get every clinical test, and a function
# credited to any vignette test gets all of them.
augment_stats() {
  "$PY" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
stats_path = Path(sys.argv[1]) / "mutants" / "mutmut-stats.json"
data = json.loads(stats_path.read_text())
tests = set(data["duration_by_test"])
by_file = {}
for t in tests:
    by_file.setdefault(t.split("::")[0], set()).add(t)
clinical = set()
for f in ("tests/test_red_flag_boundaries.py", "tests/test_vignettes.py", "tests/test_invariants.py",
          "tests/test_mutation_killers.py"):
    clinical |= by_file.get(f, set())
compile_time = ("cds.conditions.x_parse", "cds.conditions.x__fact_list", "cds.conditions.x__number",
                "cds.conditions.x__only", "cds.conditions.xǁParseContextǁ", "cds.conditions.x_facts_of",
                "cds.conditions.x_compile_predicate", "cds.engine.x__", "cds.engine.xǁ_Translatorǁ",
                "cds.engine.xǁ_FactSpecǁ", "cds.engine.xǁ_Helperǁ", "cds.engine.xǁ_Partǁ", "cds.engine.xǁ_Alphaǁ",
                "cds.engine.xǁNetworkǁcompile", "cds.engine.xǁNetworkǁ_setup_encoder")
added = 0
for fn, ts in data["tests_by_mangled_function_name"].items():
    new = set(ts)
    if any(fn.startswith(p) for p in compile_time):
        new |= clinical
    if any(t.startswith("tests/test_vignettes.py::") for t in ts):
        new |= by_file.get("tests/test_vignettes.py", set())
    added += len(new) - len(ts)
    data["tests_by_mangled_function_name"][fn] = sorted(new)
stats_path.write_text(json.dumps(data))
print(f"stats: {added} test attributions added (ruleset-compile functions and vignette fixture)")
EOF
}

case "$CMD" in
  run)
    setup
    cd "$WORK"
    export HYPOTHESIS_PROFILE=dev
    # 1. generate the mutants and the per-function test stats (no mutant selected yet)
    "$PY" -m mutmut run --max-children "$MAX_CHILDREN" "no.such.mutant" > "$WORK/generate.log" 2>&1 || true
    augment_stats
    if [[ -n "$NAMES_FILE" ]]; then cp "$NAMES_FILE" "$WORK/selected.txt"; else select_names > "$WORK/selected.txt"; fi
    echo "selected $(wc -l < "$WORK/selected.txt") mutants${SAMPLE:+ (deterministic sample of $SAMPLE)}"
    # 2. run them
    start=$(date +%s)
    xargs -a "$WORK/selected.txt" -d '\n' "$PY" -m mutmut run --max-children "$MAX_CHILDREN" \
        > "$WORK/run.log" 2>&1 || true
    echo "mutmut run took $(( $(date +%s) - start )) s"
    "$HERE/tools/mutation.sh" summary
    ;;
  rerun)
    # re-run some mutants (--names FILE) in an existing $WORK after tests/test_mutation_killers.py changed:
    # mutmut finds the new tests and collects stats for them only
    [[ -n "$NAMES_FILE" ]] || { echo "rerun needs --names FILE" >&2; exit 2; }
    for d in "$WORK/tests" "$WORK/mutants/tests"; do cp "$HERE/tests/test_mutation_killers.py" "$d/"; done
    cp "$NAMES_FILE" "$WORK/selected.txt"
    cd "$WORK"
    export HYPOTHESIS_PROFILE=dev
    xargs -a "$WORK/selected.txt" -d '\n' "$PY" -m mutmut run --max-children "$MAX_CHILDREN" > "$WORK/rerun.log" 2>&1 || true
    "$HERE/tools/mutation.sh" summary
    ;;
  results)
    cd "$WORK" && "$PY" -m mutmut results --all true
    ;;
  summary)
    cd "$WORK"
    "$PY" -m mutmut results --all true > "$WORK/results.txt" 2>/dev/null || true
    "$PY" - "$WORK" "$HERE/tools/mutation_equivalents.txt" <<'EOF'
import collections, sys
from pathlib import Path
work = Path(sys.argv[1])
equivalent = {}
if Path(sys.argv[2]).exists():
    for line in Path(sys.argv[2]).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, why = line.partition(": ")
            equivalent[name.strip()] = why.strip()
selected = set((work / "selected.txt").read_text().split())
status = {}
for line in (work / "results.txt").read_text().splitlines():
    name, _, st = line.strip().rpartition(": ")
    if name in selected:
        status[name] = st
by_module = collections.defaultdict(collections.Counter)
for name, st in status.items():
    by_module[".".join(name.split(".")[:2])][st] += 1
total = collections.Counter(status.values())
for module, c in sorted(by_module.items()) + [("TOTAL", total)]:
    killed = c["killed"] + c["timeout"]
    scored = killed + c["survived"]
    score = f"{100 * killed / scored:.1f}%" if scored else "-"
    print(f"{module:<16} {sum(c.values()):>5} mutants: killed {c['killed']}, timeout {c['timeout']}, "
          f"survived {c['survived']}, no tests {c['no tests']}, other "
          f"{sum(v for k, v in c.items() if k not in ('killed', 'timeout', 'survived', 'no tests'))}; score {score}")
eq = [n for n, st in status.items() if st == "survived" and n in equivalent]
killed_all = total["killed"] + total["timeout"]
if eq:
    scored = killed_all + total["survived"] - len(eq)
    print(f"excluding {len(eq)} argued-equivalent survivors: {killed_all}/{scored} = {100 * killed_all / scored:.1f}%")
print("(timeout = the mutant broke test collection, e.g. the shipped ruleset no longer compiles: mutmut's forkserver"
      " reports an exception in the runner as 255/timeout; counted as killed)")
print("survivors:")
for name, st in sorted(status.items()):
    if st in ("survived", "no tests"):
        print(f"  {name}  ({st})" + (f"  EQUIVALENT: {equivalent[name]}" if name in equivalent else ""))
EOF
    ;;
  *) echo "usage: $0 [run|rerun|results|summary] [--sample N] [--names FILE] [--tests FILES...]" >&2; exit 2 ;;
esac
