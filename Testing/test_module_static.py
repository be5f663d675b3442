"""Static checks of the Slicer module files (no Slicer application, no Qt here): the module script compiles, every
widget it uses exists in the .ui file, parameter names match the parameter node, every Python file is built by
GMSSegment/CMakeLists.txt, the extension metadata is complete, the GUI never blocks, and only GMSSegment.py touches Qt.
The module script is also imported with stand-ins for the parts of Slicer that need the application."""
from __future__ import annotations

import ast
import fnmatch
import importlib.util
import os
import py_compile
import re
import subprocess
import sys
import types
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODULE_DIR = REPO / "GMSSegment"
MODULE_PY = MODULE_DIR / "GMSSegment.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "GMSSegment.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"

QT_MODULES = {"qt", "ctk", "PythonQt", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper"}
KNOWN_WIDGETS = {
    "qMRMLWidget", "qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox", "qMRMLSubjectHierarchyTreeView",
    "ctkCollapsibleButton", "ctkPathLineEdit", "ctkDirectoryButton", "ctkComboBox", "ctkCheckBox",
    "ctkSliderWidget", "QLabel", "QPushButton", "QComboBox", "QCheckBox", "QProgressBar", "QPlainTextEdit",
    "QTableWidget", "QLineEdit", "QSpinBox", "QWidget", "QGroupBox", "QTextEdit",
}


def module_source() -> str:
    return MODULE_PY.read_text(encoding="utf-8")


def ui_tree() -> ET.ElementTree:
    return ET.parse(UI_FILE)


def ui_widgets() -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in ui_tree().iter("widget")}


def parameter_fields() -> dict[str, str]:
    """Annotated fields of the @parameterNodeWrapper class in GMSSegment.py."""
    tree = ast.parse(module_source())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list):
            return {stmt.target.id: ast.unparse(stmt.annotation) for stmt in node.body
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)}
    raise AssertionError("no @parameterNodeWrapper class in GMSSegment.py")


# ------------------------------------------------------------------------------------------------------- module file


def test_every_python_file_compiles(tmp_path):
    files = sorted(MODULE_DIR.rglob("*.py"))
    assert MODULE_PY in files
    for i, path in enumerate(files):
        py_compile.compile(str(path), cfile=str(tmp_path / f"{i}.pyc"), doraise=True)


def test_ui_file_is_valid_and_declares_custom_widgets():
    tree = ui_tree()
    root = tree.getroot()
    assert root.tag == "ui"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "GMSSegment"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    widgets = ui_widgets()
    assert len(widgets) == len(list(root.iter("widget"))), "widget names must be unique"
    for name, cls in widgets.items():
        assert cls in KNOWN_WIDGETS, f"{name}: unexpected widget class {cls}"
        if not cls.startswith("Q"):
            assert cls in declared, f"{cls} used by {name} is not declared in <customwidgets>"
    # MRML widgets get the scene through the top widget's mrmlSceneChanged signal
    mrml = {n for n, c in widgets.items() if c.startswith("qMRML") and c != "qMRMLWidget"}
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert mrml <= connected, f"MRML widgets without a scene: {sorted(mrml - connected)}"


def test_every_ui_widget_used_by_the_module_exists():
    used = set(re.findall(r"self\.ui\.(\w+)", module_source()))
    assert used, "GMSSegment.py uses no widgets?"
    missing = used - set(ui_widgets())
    assert not missing, f"widgets used in GMSSegment.py but missing from {UI_FILE.name}: {sorted(missing)}"
    for name in ("segmentButton", "segmentAllButton", "cancelButton", "progressBar", "logTextEdit",
                 "inputVolumeSelector", "modelPathLineEdit", "weightsPathLineEdit", "deviceComboBox",
                 "axisComboBox", "outputSegmentationSelector", "batchVolumesComboBox"):
        assert name in ui_widgets(), name


def test_parameter_names_match_the_parameter_node():
    bound = {}
    for widget in ui_tree().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                assert prop.get("stdset") == "0", "SlicerParameterName must be a dynamic property"
                bound[prop.findtext("string")] = widget.get("class")
    fields = parameter_fields()
    assert set(bound) == set(fields), (sorted(bound), sorted(fields))
    # widget types the parameter node wrapper can connect to these types
    assert bound["inputVolume"] == "qMRMLNodeComboBox" and "vtkMRMLScalarVolumeNode" in fields["inputVolume"]
    assert bound["outputSegmentation"] == "qMRMLNodeComboBox" and "Segmentation" in fields["outputSegmentation"]
    assert bound["modelPath"] == "ctkPathLineEdit" and "Path" in fields["modelPath"]
    assert bound["device"] == "QComboBox" and bound["axis"] == "QComboBox"


def test_module_structure_follows_the_scripted_module_template():
    tree = ast.parse(module_source())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    bases = {name: [ast.unparse(b) for b in cls.bases] for name, cls in classes.items()}
    assert "ScriptedLoadableModule" in bases["GMSSegment"]
    assert "ScriptedLoadableModuleWidget" in bases["GMSSegmentWidget"]
    assert "ScriptedLoadableModuleLogic" in bases["GMSSegmentLogic"]
    assert "ScriptedLoadableModuleTest" in bases["GMSSegmentTest"]
    methods = {f.name for f in classes["GMSSegmentTest"].body if isinstance(f, ast.FunctionDef)}
    assert {"setUp", "runTest"} <= methods and any(m.startswith("test_") for m in methods)
    assert "def ensureDependencies" in module_source()


def _calls(node) -> list[str]:
    return [ast.unparse(n.func) for n in ast.walk(node) if isinstance(n, ast.Call)]


def test_gui_never_blocks():
    """The widget polls the job with a QTimer and never waits: no sleeps, waits, blocking runs or subprocesses."""
    tree = ast.parse(module_source())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GMSSegmentWidget")
    calls = _calls(widget)
    forbidden = [c for c in calls if re.search(r"(^|\.)(wait|sleep|segment|communicate|check_output|run)$", c)
                 or c.startswith("subprocess.") or c.endswith("processEvents")]
    assert not forbidden, forbidden
    assert "qt.QTimer" in calls
    assert any(c.endswith("setInterval") for c in calls)
    m = re.search(r"^POLL_INTERVAL_MS\s*=\s*(\d+)", module_source(), re.M)
    assert m and int(m.group(1)) <= 100
    poll = next(f for f in widget.body if isinstance(f, ast.FunctionDef) and f.name == "onPollTimer")
    assert "job.poll" in _calls(poll)


def test_only_the_module_script_imports_qt():
    offenders = []
    for path in sorted(MODULE_DIR.rglob("*.py")):
        if path == MODULE_PY:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n in QT_MODULES]
    assert not offenders, offenders
    tree = ast.parse(module_source())
    top_imports = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    assert {"qt", "ctk", "slicer"} <= top_imports
    assert "torch" not in top_imports  # never loaded into the application at import time


def test_logic_imports_without_qt():
    code = ("import sys; import GMSSegmentLib.slicer_logic as L; "
            "bad = [m for m in ('qt', 'ctk', 'torch', 'PythonQt') if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    env = {"PYTHONPATH": str(MODULE_DIR), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


# ----------------------------------------------------------------------------------------------------------- CMake


def _cmake_commands(text: str) -> list[tuple[str, list[str]]]:
    text = re.sub(r"#[^\n]*", "", text)
    return [(m.group(1).lower(), m.group(2).split()) for m in re.finditer(r"(\w+)\s*\(([^)]*)\)", text)]


def _module_cmake():
    commands = _cmake_commands(MODULE_CMAKE.read_text())
    variables: dict[str, list[str]] = {}
    globs: dict[str, list[str]] = {}
    for name, args in commands:
        if name == "set" and args:
            variables[args[0]] = args[1:]
        elif name == "file" and args and args[0] in ("GLOB", "GLOB_RECURSE"):
            patterns = [a for a in args[2:] if "*" in a]
            globs[args[1]] = [(args[0], p) for p in patterns]
    return commands, variables, globs


def _expand(values: list[str], variables: dict) -> list[str]:
    out = []
    for v in values:
        v = v.replace("${MODULE_NAME}", variables.get("MODULE_NAME", ["?"])[0])
        m = re.fullmatch(r"\$\{(\w+)\}", v)
        if m and m.group(1) in variables:
            out += _expand(variables[m.group(1)], variables)
        else:
            out.append(v)
    return out


def _glob_matches(kind: str, pattern: str, relpath: str, module_name: str) -> bool:
    pattern = pattern.replace("${CMAKE_CURRENT_SOURCE_DIR}/", "").replace("${MODULE_NAME}", module_name)
    folder, _, name = pattern.rpartition("/")
    rel_folder, _, rel_name = relpath.rpartition("/")
    if kind == "GLOB_RECURSE":
        inside = rel_folder == folder or rel_folder.startswith(folder + "/") if folder else True
    else:
        inside = rel_folder == folder
    return inside and fnmatch.fnmatch(rel_name, name)


def test_cmake_builds_every_python_file():
    commands, variables, globs = _module_cmake()
    assert variables["MODULE_NAME"] == ["GMSSegment"]
    build = [args for name, args in commands if name == "slicermacrobuildscriptedmodule"]
    assert build, "slicerMacroBuildScriptedModule missing"
    args = build[0]
    assert "WITH_GENERIC_TESTS" in args
    scripts_var = args[args.index("SCRIPTS") + 1]
    scripts = _expand([scripts_var], variables)
    explicit = {s for s in scripts if not s.startswith("${")}
    glob_vars = [re.fullmatch(r"\$\{(\w+)\}", s).group(1) for s in variables["MODULE_PYTHON_SCRIPTS"]
                 if re.fullmatch(r"\$\{(\w+)\}", s) and re.fullmatch(r"\$\{(\w+)\}", s).group(1) in globs]
    patterns = [kp for v in glob_vars for kp in globs[v]]
    missing = []
    for path in sorted(MODULE_DIR.rglob("*.py")):
        rel = path.relative_to(MODULE_DIR).as_posix()
        if "__pycache__" in rel:
            continue
        if rel in explicit or any(_glob_matches(k, p, rel, "GMSSegment") for k, p in patterns):
            continue
        missing.append(rel)
    assert not missing, f"Python files not built by {MODULE_CMAKE}: {missing}"
    for must in ("GMSSegment.py", "GMSSegmentLib/slicer_logic/__init__.py", "GMSSegmentLib/cli.py",
                 "GMSSegmentLib/__main__.py", "GMSSegmentLib/autoencoders/taef2.py"):
        assert must in explicit or any(_glob_matches(k, p, must, "GMSSegment") for k, p in patterns), must
    # the module self test runs as a ctest
    assert any(name == "slicer_add_python_unittest" and "${MODULE_NAME}.py" in a for name, a in commands)


def test_cmake_resources_exist():
    _, variables, _ = _module_cmake()
    resources = [r for r in _expand(variables["MODULE_PYTHON_RESOURCES"], variables) if not r.startswith("${")]
    assert "Resources/UI/GMSSegment.ui" in resources and "Resources/Icons/GMSSegment.png" in resources
    for r in resources:
        assert (MODULE_DIR / r).is_file(), r


@pytest.mark.parametrize("icon", [MODULE_DIR / "Resources" / "Icons" / "GMSSegment.png",
                                  REPO / "Resources" / "Icons" / "GMSSegment.png"])
def test_icons(icon):
    PIL = pytest.importorskip("PIL.Image")
    with PIL.open(icon) as im:
        assert im.size == (128, 128) and im.format == "PNG"


def test_extension_metadata():
    text = (REPO / "CMakeLists.txt").read_text()
    fields = dict(re.findall(r"set\((EXTENSION_\w+)\s+(.*?)\)\s*(?:#.*)?$", text, re.M))
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_DEPENDS"):
        assert fields.get(key, "").strip('" '), key
    assert fields.get("EXTENSION_SCREENSHOTURLS", "").strip('" ')  # the Extensions Index refuses an empty one
    assert fields["EXTENSION_CATEGORY"].strip('"') == "Segmentation"
    assert "PyTorch" in fields["EXTENSION_DEPENDS"]
    assert "add_subdirectory(GMSSegment)" in text
    assert "find_package(Slicer REQUIRED)" in text and "Slicer_EXTENSION_CPACK" in text

    s4ext = {}
    for line in (REPO / "GMSSegment.s4ext").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            s4ext[key] = value.strip()
    for key in ("scm", "scmurl", "depends", "homepage", "contributors", "category", "iconurl", "description",
                "status", "enabled"):
        assert s4ext.get(key), key
    assert s4ext.get("screenshoturls")  # the same pictures as EXTENSION_SCREENSHOTURLS (checked below)
    assert s4ext["scm"] == "git" and s4ext["depends"] == "PyTorch" and s4ext["category"] == "Segmentation"
    assert s4ext["enabled"] in ("0", "1")
    assert s4ext["iconurl"].endswith("Resources/Icons/GMSSegment.png")

    # both files name the same pictures, and every one of them served from this repository exists in it
    cmake_urls = fields["EXTENSION_ICONURL"].strip('"').split() + fields["EXTENSION_SCREENSHOTURLS"].strip('"').split()
    assert cmake_urls == s4ext["iconurl"].split() + s4ext["screenshoturls"].split()
    raw = "https://raw.githubusercontent.com/gmssegment/SlicerGMSSegment/main/"
    for url in cmake_urls:
        if url.startswith(raw):
            assert (REPO / url[len(raw):]).is_file(), f"{url} names a file that is not in the repository"


# --------------------------------------------------------------------- the module script with a stand-in Slicer app


class _Settings:
    store: dict = {}

    def value(self, key, default=None):
        return self.store.get(key, default)

    def setValue(self, key, value):
        self.store[key] = value


@pytest.fixture
def module(monkeypatch, tmp_path):
    """Import GMSSegment.py with stand-ins for qt, ctk and the application-only parts of slicer."""
    slicer = pytest.importorskip("slicer")

    qt = types.ModuleType("qt")
    qt.QSettings = _Settings
    qt.QTimer = object
    ctk = types.ModuleType("ctk")
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__[: -len("Logic")]

        def getParameterNode(self):
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetModuleName(self.moduleName)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        displayed: list = []  # what delayDisplay showed

        def delayDisplay(self, message, msec=None):
            self.displayed.append(message)

    slm.ScriptedLoadableModule = type("ScriptedLoadableModule", (), {
        "__init__": lambda self, parent: setattr(self, "parent", parent)})
    slm.ScriptedLoadableModuleWidget = type("ScriptedLoadableModuleWidget", (), {})
    slm.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    slm.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    i18n = types.ModuleType("slicer.i18n")  # Slicer's translation (QCoreApplication.translate); slicer-core has none
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: f"{context}|{text}"
    pnw = types.ModuleType("slicer.parameterNodeWrapper")

    def parameterNodeWrapper(cls):  # the real one adds typed properties backed by the node
        def __init__(self, node):
            self.parameterNode = node

        cls.__init__ = __init__
        return cls

    pnw.parameterNodeWrapper = parameterNodeWrapper
    for name, mod in (("qt", qt), ("ctk", ctk), ("slicer.ScriptedLoadableModule", slm),
                      ("slicer.parameterNodeWrapper", pnw), ("slicer.i18n", i18n)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.syspath_prepend(str(MODULE_DIR))
    spec = importlib.util.spec_from_file_location("GMSSegment_under_test", MODULE_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_module_script_imports_and_logic_works(module):
    from GMSSegmentLib import slicer_logic

    logic = module.GMSSegmentLogic()
    assert isinstance(logic, slicer_logic.SegmentationLogic)
    assert logic.moduleName == "GMSSegment"
    assert logic.getParameterNode().parameterNode.GetModuleName() == "GMSSegment"
    assert not logic.running
    assert [d.value for d in module.Device] == ["auto", "cpu", "cuda"]
    assert all(d.label() for d in module.Device) and all(a.label() for a in module.SlicingAxis)
    assert module.SlicingAxis.MODEL.axisIndex() is None and module.SlicingAxis.AXIS1.axisIndex() == 1
    assert module._pathOrNone(Path()) is None and module._pathOrNone("") is None
    assert module._pathOrNone(Path("/x/model")) == "/x/model"


class _Gui:
    """Stand-ins for the application's dialogs, wait cursor and testing flag (Qt), and for what installs packages in
    Slicer (the PyTorch extension's installTorch, slicer.packaging.pip_ensure / slicer.util.pip_install): they record
    what the module asked for."""

    def __init__(self, monkeypatch, installed: dict, answer=True, testing=False, packaging=True):
        import slicer

        from GMSSegmentLib import dependencies

        self.calls, self.installed, self.answer, self.failure = [], installed, answer, None
        gui = self

        class WaitCursor:
            def __enter__(self):
                gui.calls.append(("wait cursor",))

            def __exit__(self, *exc):
                gui.calls.append(("normal cursor",))

        class PyTorchUtilsLogic:
            def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                             torchvisionVersionRequirement=None):
                gui.calls.append(("installTorch", askConfirmation, torchVersionRequirement))
                gui._install("torch", "2.5.1")
                return object()

        def pip(kind):
            def install(requirements, **kwargs):
                gui.calls.append((kind, list(requirements), kwargs))
                for r in requirements:
                    gui._install(dependencies.parseRequirement(r)[0], "99")
            return install

        monkeypatch.setattr(dependencies, "installedVersion", lambda name: self.installed.get(name))
        monkeypatch.setattr(slicer, "app", types.SimpleNamespace(testingEnabled=lambda: testing), raising=False)
        for name, fn in (("confirmOkCancelDisplay", self._confirm), ("errorDisplay", self._error),
                         ("WaitCursor", WaitCursor), ("pip_install", pip("pip_install"))):
            monkeypatch.setattr(slicer.util, name, fn, raising=False)
        monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
        if packaging:
            monkeypatch.setitem(sys.modules, "slicer.packaging", types.SimpleNamespace(pip_ensure=pip("pip_ensure")))
        else:  # Slicer 5.8 and 5.10
            monkeypatch.setitem(sys.modules, "slicer.packaging", None)

    def _install(self, name, version):
        if self.failure is not None:
            raise self.failure
        self.installed[name] = version

    def _confirm(self, text, windowTitle=None, **kwargs):
        self.calls.append(("confirm", text))
        return self.answer

    def _error(self, text, **kwargs):
        self.calls.append(("error", text))

    def kinds(self):
        return [c[0] for c in self.calls]


BASE = {"numpy": "2.0", "SimpleITK": "2.4", "scipy": "1.14", "pillow": "11"}


def test_ensure_dependencies_asks_once_for_everything(module, monkeypatch):
    """One confirmation lists everything that will be installed, PyTorch included; then PyTorch comes from the
    PyTorch extension with the minimum version (no second prompt) and the rest from slicer.packaging.pip_ensure
    (Slicer 5.12+, its own prompt off), or slicer.util.pip_install on 5.8 and 5.10. tqdm is never asked for."""
    gui = _Gui(monkeypatch, dict(BASE, torch="2.5.0", safetensors="0.4.5"))
    assert module.ensureDependencies() is True and gui.calls == []  # nothing missing: nothing asked

    gui = _Gui(monkeypatch, dict(BASE), answer=False)
    assert module.ensureDependencies() is False
    assert gui.kinds() == ["confirm"]  # declined: nothing installed
    text = gui.calls[0][1]
    assert "PyTorch (torch>=2.1" in text and "safetensors>=0.4" in text and "tqdm" not in text

    gui = _Gui(monkeypatch, dict(BASE))
    assert module.ensureDependencies() is True
    assert gui.kinds() == ["confirm", "wait cursor", "installTorch", "normal cursor", "pip_ensure"]
    assert gui.calls[2] == ("installTorch", False, ">=2.1")
    assert gui.calls[4] == ("pip_ensure", ["safetensors>=0.4"], {"prompt_install": False, "requester": "GMSSegment"})

    gui = _Gui(monkeypatch, dict(BASE, torch="2.5.0"), packaging=False)
    assert module.ensureDependencies() is True
    assert gui.kinds() == ["confirm", "wait cursor", "pip_install", "normal cursor"]
    assert gui.calls[2][1] == ["safetensors>=0.4"]


def test_ensure_dependencies_failures_show_one_dialog(module, monkeypatch):
    """A failed installation (pip's or light-the-torch's CalledProcessError, a prompt declined inside pip_ensure) and
    a PyTorch older than the minimum each give one error dialog and False, never an exception (the GUI stays
    usable); an old PyTorch is not installed over (the user upgrades it in PyTorch Utils); nothing is installed in
    testing mode."""
    import subprocess

    for failure in (subprocess.CalledProcessError(1, "pip install"), RuntimeError("User declined")):
        gui = _Gui(monkeypatch, dict(BASE))
        gui.failure = failure
        assert module.ensureDependencies() is False
        assert gui.kinds() == ["confirm", "wait cursor", "installTorch", "normal cursor", "error"]
        assert str(failure) in gui.calls[-1][1]
        gui = _Gui(monkeypatch, dict(BASE, torch="2.5.0"))
        gui.failure = failure
        assert module.ensureDependencies() is False
        assert gui.kinds() == ["confirm", "pip_ensure", "error"]

    gui = _Gui(monkeypatch, dict(BASE, torch="1.13.1"))
    assert module.ensureDependencies() is False
    assert gui.kinds() == ["error"]
    assert all(t in gui.calls[0][1] for t in ("PyTorch 1.13.1", "PyTorch Utils", ">=2.1"))

    gui = _Gui(monkeypatch, dict(BASE), testing=True)
    assert module.ensureDependencies() is False and gui.calls == []

    gui = _Gui(monkeypatch, dict(BASE))
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # the PyTorch extension is not installed
    assert module.ensureDependencies() is False
    assert gui.kinds() == ["error"] and "'PyTorch' extension" in gui.calls[0][1]


def test_buttons_survive_a_failed_installation(module, monkeypatch, tmp_path):
    """Segment, Segment all and Adapt with an installation that fails: one error dialog each, no exception out of
    the slot, nothing started; Adapt asks (and installs) after its wait cursor is gone. Stand-ins: the widget's Qt
    parts, the dialogs and tryWithErrorDisplay's wait cursor."""
    import contextlib
    import subprocess

    import slicer

    gui = _Gui(monkeypatch, dict(BASE, torch="2.5.0"))
    gui.failure = subprocess.CalledProcessError(1, "pip install")

    @contextlib.contextmanager
    def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
        gui.calls.append(("wait cursor",) if waitCursor else ("no cursor",))
        try:
            yield
        finally:
            gui.calls.append(("normal cursor",))

    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", tryWithErrorDisplay)
    monkeypatch.setenv("GMS_MODELS_DIR", str(tmp_path))
    started = []
    model = str(MODULE_DIR / "Resources" / "Models" / "busi-lesion")
    logic = types.SimpleNamespace(start=lambda *a, **k: started.append(a), isSegmentableVolume=lambda n: True,
                                  startTraining=lambda *a, **k: started.append(a), loadedVolumes=lambda s: ["volume"],
                                  trainingPairs=lambda *a, **k: [("v1", "s1"), ("v2", "s2")])
    nodes = types.SimpleNamespace(checkedNodes=lambda: [])
    widget = module.GMSSegmentWidget.__new__(module.GMSSegmentWidget)
    widget.logic = logic
    widget._parameterNode = types.SimpleNamespace(
        modelPath=Path(model), device=module.Device.CPU, axis=module.SlicingAxis.MODEL, testTimeAugmentation=True,
        uncertaintyMap=True, inputVolume="volume", outputSegmentation=None)
    widget.ui = types.SimpleNamespace(weightsPathLineEdit=types.SimpleNamespace(currentPath=""),
                                      batchVolumesComboBox=nodes, adaptSegmentationsComboBox=nodes,
                                      adaptNameLineEdit=types.SimpleNamespace(text="mine"),
                                      adaptMinutesSpinBox=types.SimpleNamespace(value=5))
    monkeypatch.setattr(slicer, "mrmlScene", None, raising=False)
    for slot in (widget.onSegmentButton, widget.onSegmentAllButton, widget.onAdaptButton):
        gui.calls.clear()
        slot()  # returns: no exception reaches Qt
        assert gui.kinds().count("error") == 1 and not started, (slot.__name__, gui.calls)
    assert gui.kinds() == ["wait cursor", "normal cursor", "confirm", "pip_ensure", "error"]  # Adapt


def test_module_category_is_translated_as_the_template_does(module):
    """Slicer's scripted module template (5.8 to main): categories = [translate("qSlicerAbstractCoreModule", ...)]."""
    parent = types.SimpleNamespace()
    module.GMSSegment(parent)
    assert parent.categories == ["qSlicerAbstractCoreModule|Segmentation"]


def test_self_test_in_both_runners(module, monkeypatch):
    """The module's self test, as Slicer runs it, on slicer-core (stand-ins: the application's scene, event loop and
    delayDisplay). Under unittest's runner (ctest) it segments a volume made in the test with the bundled model and
    cancels a run; nothing is installed or downloaded here (the weights come from GMS_WEIGHTS_DIR). Where a package
    is missing, each test is skipped with one line in both runners: unittest reports skips, and runTest (Reload and
    Test, which calls it directly) shows the line and returns instead of failing."""
    import slicer

    from GMSSegmentLib import slicer_logic

    monkeypatch.setattr(slicer, "mrmlScene", slicer.vtkMRMLScene(), raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(processEvents=lambda: None, testingEnabled=lambda: True),
                        raising=False)
    def ctest():  # what slicer.testing.runUnitTest does with the module's test case
        return unittest.TextTestRunner(verbosity=0).run(unittest.TestLoader().loadTestsFromTestCase(
            module.GMSSegmentTest))

    result = ctest()
    assert result.wasSuccessful() and result.testsRun == 3 and not result.skipped, (result.errors, result.failures)

    real = slicer_logic.requirementsForModel
    monkeypatch.setattr(slicer_logic, "requirementsForModel", lambda m: real(m) + ["surely-not-installed-gms>=1"])
    result = ctest()
    assert result.wasSuccessful() and len(result.skipped) == 2
    assert all("surely-not-installed-gms>=1" in reason and "\n" not in reason for _, reason in result.skipped)
    module.GMSSegmentTest.displayed.clear()
    module.GMSSegmentTest().runTest()  # Reload and Test: returns normally
    skipped = [m for m in module.GMSSegmentTest.displayed if " skipped: " in m]
    assert [m.split(" skipped: ")[0] for m in skipped] == ["test_GMSSegment_segmentSample", "test_GMSSegment_cancel"]


def test_adapted_models_folder_joins_the_model_search_path(module, monkeypatch, tmp_path, tiny_model):
    """Models adapted in Slicer go to the user models folder, which the widget puts on GMS_MODELS_DIR so that the
    model list and the worker find them by name (other folders already on the path stay, first)."""
    import shutil

    from GMSSegmentLib import slicer_logic

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("GMS_MODELS_DIR", str(tmp_path / "site-models"))
    folder = module.addUserModelsToSearchPath()
    assert folder == module.userModelsDirectory() and folder.startswith(str(tmp_path))
    assert module.addUserModelsToSearchPath() == folder  # added once
    assert os.environ["GMS_MODELS_DIR"].split(os.pathsep) == [str(tmp_path / "site-models"), folder]
    assert "my-adapted" not in dict(slicer_logic.findModels())
    shutil.copytree(tiny_model, Path(folder) / "my-adapted")
    assert dict(slicer_logic.findModels())["my-adapted"] == str((Path(folder) / "my-adapted").resolve())
    assert slicer_logic.resolveModel("my-adapted") == str((Path(folder) / "my-adapted").resolve())


def test_model_summary_states_purpose_accuracy_and_licence(module):
    """The model line under the selector (slicer_logic.modelSummary) tells a user what each bundled model segments,
    how well it did on its recorded test evaluation (at the input size when recorded, else native), and the licence
    of its data; an adapted model shows its validation Dice and what it was adapted from."""
    import copy

    from GMSSegmentLib import slicer_logic

    bundled = {name: slicer_logic.readModelCard(folder) for name, folder in slicer_logic.findModels()
               if Path(folder).parent == MODULE_DIR / "Resources" / "Models"}
    assert {"busi-lesion", "kvasir-polyp", "hippocampus"} <= set(bundled)
    for name, card in bundled.items():
        text = slicer_logic.modelSummary(card)
        assert text.startswith(f"{name}: {card['description'].rstrip('.')}.")
        assert all(s["name"] in text for s in card["segments"]) and card["licence"] in text
        metric = slicer_logic.headlineMetric(card)
        assert metric is not None and f"Dice {metric['dice']:.3f} (" in text
    busi = bundled["busi-lesion"]["metrics"]["busi/test/model"]
    assert slicer_logic.headlineMetric(bundled["busi-lesion"]) == {
        "dice": busi["segments"]["lesion"]["dice_mean"], "cases": 130, "what": "busi test, at the input size"}
    hippo = bundled["hippocampus"]["metrics"]["hippocampus/val/native"]
    assert slicer_logic.headlineMetric(bundled["hippocampus"])["dice"] == hippo["segments"]["mean"]["dice_mean"]

    adapted = copy.deepcopy(bundled["busi-lesion"])
    adapted.name, adapted.metrics = "my-busi", {"validation": {"dice": 0.8123, "cases": 3}}  # a ModelCard
    adapted["training"]["init_from"] = {"name": "busi-lesion"}
    text = slicer_logic.modelSummary(adapted)
    assert "Dice 0.812 (held-out validation cases, 3 cases)" in text and "Adapted from busi-lesion." in text
    del adapted["metrics"]
    assert "Dice" not in slicer_logic.modelSummary(adapted)


def test_adapting_shows_the_cross_validated_estimate_before_the_model_is_kept(module, monkeypatch, tmp_path):
    """When adapting ends, the user sees the cross-validated before/after Dice with its uncertainty: a refused
    adaptation is one message (no model), an adopted one asks whether to keep the model; No removes it, Yes selects
    it."""
    import shutil
    import types as t

    import slicer

    from GMSSegmentLib import slicer_logic

    shown = []
    monkeypatch.setattr(slicer.util, "infoDisplay", lambda text, **kw: shown.append(("info", text)), raising=False)
    answers = []
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay",
                        lambda text, **kw: shown.append(("ask", text)) or answers.pop(0), raising=False)
    estimate = {"cases": 20, "folds": 5, "before": 0.83, "after": 0.881, "gain": 0.051, "se": 0.013, "better": 17,
                "worse": 3, "adopted": True}

    def finished_job(folder, refused):
        job = object.__new__(slicer_logic.TrainingJob)  # the state a finished worker leaves, without a worker
        job.state, job.refused, job.estimate = slicer_logic.JobState.SUCCEEDED, refused, dict(estimate)
        job.modelDir, job._log, job._cancelRequested = folder, [], False
        return job

    widget = t.SimpleNamespace(ui=t.SimpleNamespace(statusLabel=t.SimpleNamespace(text="")),
                               _populateModels=lambda: None,
                               _parameterNode=t.SimpleNamespace())
    finish = module.GMSSegmentWidget._onJobFinished

    monkeypatch.setattr(slicer_logic.TrainingJob, "elapsed", property(lambda self: 540.0))
    refused = finished_job("", True)
    refused.estimate.update(after=0.824, gain=-0.006, se=0.009, better=8, worse=12, adopted=False)
    finish(widget, refused)
    assert shown[-1][0] == "info" and shown[-1][1].startswith(
        "No model saved: cross-validated Dice 83.0 -> 82.4 (gain -0.6 ± 0.9 over 20 cases, 8 better, 12 worse)")

    folder = tmp_path / "adapted"
    shutil.copytree(MODULE_DIR / "Resources" / "Models" / "kvasir-polyp", folder)
    answers.append(False)
    finish(widget, finished_job(str(folder), False))
    assert shown[-1][0] == "ask" and "cross-validated Dice 83.0 -> 88.1 (gain +5.1 ± 1.3 over 20 cases" in shown[-1][1]
    assert not folder.exists() and widget.ui.statusLabel.text == "The adapted model was discarded."

    shutil.copytree(MODULE_DIR / "Resources" / "Models" / "kvasir-polyp", folder)
    answers.append(True)
    finish(widget, finished_job(str(folder), False))
    assert folder.is_dir() and widget._parameterNode.modelPath == Path(folder)
    assert shown[-1] == ("info", shown[-2][1].split("\n\n")[0] + "\nIt is now the selected model.")
    assert not answers


def test_review_orders_the_batch_and_steps_through_the_uncertain_slices(module, monkeypatch):
    """A finished batch lists the most uncertain results first with their score; "Next uncertain slice" shows the
    selected (else the most uncertain) result with its map over the image and moves the views slice by slice, most
    uncertain first."""
    import contextlib
    import types as t

    import slicer

    from GMSSegmentLib import slicer_logic

    class Item:
        def __init__(self):
            self.text = ""

        def setText(self, text):
            self.text = text

        def setToolTip(self, text):
            pass

    class Table:
        def __init__(self):
            self.items, self.selected = {}, []

        def setRowCount(self, n):
            self.rows = n

        def item(self, row, column):
            return self.items.get((row, column))

        def setItem(self, row, column, item):
            self.items[(row, column)] = item

        def selectionModel(self):
            return t.SimpleNamespace(selectedRows=lambda: [t.SimpleNamespace(row=lambda: r) for r in self.selected])

    nodes = {"v0": "volume0", "v1": "volume1", "v2": "volume2", "u1": "map1"}
    layers, jumps = [], []
    monkeypatch.setattr(slicer, "mrmlScene", t.SimpleNamespace(GetNodeByID=nodes.get), raising=False)
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **kw: layers.append(kw), raising=False)
    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", lambda *a, **kw: contextlib.nullcontext(), raising=False)
    monkeypatch.setattr(slicer_logic, "jumpToSlice", lambda scene, task, index: jumps.append((task.volumeName, index)))
    monkeypatch.setattr(module.qt, "QTableWidgetItem", Item, raising=False)

    def task(i, state, score, slices=(), mapID=None):
        return slicer_logic.VolumeTask(index=i, volumeNodeID=f"v{i}", volumeName=f"vol{i}", inputPath="",
                                       outputPath="", state=state, uncertainty=score, sliceUncertainty=list(slices),
                                       sliceAxis=0, uncertaintyNodeID=mapID)

    S, F = slicer_logic.TaskState.SUCCEEDED, slicer_logic.TaskState.FAILED
    job = object.__new__(slicer_logic.SegmentationJob)
    job.tasks = [task(0, S, 0.1, [0.0, 0.1]), task(1, S, 0.5, [0.2, 0.0, 0.6], "u1"), task(2, F, None)]
    job.batch, job.state = True, slicer_logic.JobState.PARTIAL
    monkeypatch.setattr(slicer_logic.SegmentationJob, "finished", property(lambda self: True))
    table = Table()
    ns = t.SimpleNamespace(
        ui=t.SimpleNamespace(batchStatusTable=table, nextUncertainButton=t.SimpleNamespace(enabled=False),
                             reviewLabel=t.SimpleNamespace(text="")),
        _parameterNode=t.SimpleNamespace(uncertaintyOpacity=0.4), _job=job, _tableTasks=[], _reviewVolumeID=None,
        _reviewSlice=None)
    W = module.GMSSegmentWidget
    for name in ("_reviewTask", "_showResult", "_updateReview", "onNextUncertainButton"):
        setattr(ns, name, getattr(W, name).__get__(ns))
    W._fillBatchTable(ns, job)
    assert [table.item(r, 0).text for r in range(3)] == ["vol1", "vol0", "vol2"]
    assert [table.item(r, 2).text for r in range(3)] == ["0.50", "0.10", ""]

    ns.onNextUncertainButton()  # nothing selected: the most uncertain result, its worst slice
    assert layers[-1] == {"background": "volume1", "foreground": "map1", "foregroundOpacity": 0.4, "fit": False}
    assert jumps == [("vol1", 2)] and ns.ui.nextUncertainButton.enabled
    assert ns.ui.reviewLabel.text == "Slice 3 of 3: score 0.60"
    ns.onNextUncertainButton()
    ns.onNextUncertainButton()  # slices scoring 0 are skipped; after the last it starts again
    assert jumps[1:] == [("vol1", 0), ("vol1", 2)]

    table.selected = [1]  # the user picks the other result: shown without a map (none was asked for)
    ns.onNextUncertainButton()
    assert layers[-1] == {"background": "volume0", "fit": False} and jumps[-1] == ("vol0", 1)
