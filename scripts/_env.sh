# Shared by scripts/setup, scripts/test and scripts/compat: environments that hold poolscope as a
# user installs it (a wheel or an sdist, not an editable checkout), and the suite run against it.

# A hash of everything that goes into the distributions: reinstall only when it changes.
sources_digest() {
  find poolscope pyproject.toml MANIFEST.in README.md poolscope_pytest.py -type f \
    -not -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
}

# find_python 3.13: an interpreter of that version (a path, a pyenv version, or pythonX.Y on PATH).
find_python() {
  local want=$1 root candidate
  if [ -x "$want" ]; then echo "$want"; return; fi
  root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  for candidate in $(ls -d "$root/versions/$want"* 2>/dev/null | sort -V -r); do
    if [ -x "$candidate/bin/python" ]; then echo "$candidate/bin/python"; return; fi
  done
  command -v "python$want" || { echo "no Python $want found (pyenv or python$want on PATH)" >&2; return 1; }
}

# install_dist VENV DIST: poolscope from the distribution file DIST, with its test extras; the torch
# already in VENV stays (poolscope asks only torch>=2.4).
install_dist() {
  local venv=$1 dist=$2
  # PIP_CONSTRAINT=/dev/null: this machine's pip cap on torch would otherwise replace a newer torch.
  PIP_CONSTRAINT=/dev/null "$venv/bin/python" -m pip install --quiet "$dist[test]"
  # Same version number as an earlier build: force this file's contents in.
  PIP_CONSTRAINT=/dev/null "$venv/bin/python" -m pip install --quiet --force-reinstall --no-deps "$dist"
}

# run_suite VENV [pytest args]: the test suite against the poolscope installed in VENV, from a copy
# of the tests outside the checkout, so that nothing can import the checkout's sources. conftest.py
# fails the run if poolscope is imported from the checkout all the same.
run_suite() {
  local venv checkout run status=0
  venv=$(cd "$1" && pwd); shift
  checkout=$(pwd)
  run=$(mktemp -d "${TMPDIR:-/tmp}/poolscope-tests.XXXXXX")
  cp -r tests examples docs benchmarks README.md pyproject.toml "$run/"
  (cd "$run" && POOLSCOPE_TEST_CHECKOUT="$checkout" "$venv/bin/python" -m pytest -p no:cacheprovider "$@") || status=$?
  rm -rf "$run"
  if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: the set-up is broken" >&2
  fi
  return "$status"
}

# torch_env VENV PYTHON TORCH_VERSION: a fresh environment holding only that torch (a user's
# environment before poolscope). 2.13.0 is the CPU build on this machine's disk; other versions
# come from the registry (CUDA builds of several GB; they run on the CPU too). The machine's pip
# cap on torch is lifted for these commands only.
torch_env() {
  local venv=$1 python=$2 torch_version=$3
  rm -rf "$venv"
  "$python" -m venv "$venv"
  PIP_CONSTRAINT=/dev/null "$venv/bin/python" -m pip install --quiet --upgrade pip
  PIP_CONSTRAINT=/dev/null "$venv/bin/python" -m pip install --quiet "torch==$torch_version"
}
