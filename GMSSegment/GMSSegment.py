"""GMSSegment: segment medical images with Generative Medical Segmentation (GMS) in 3D Slicer.

This file holds only the Slicer module, its widget and its self test. All the work is done by
``GMSSegmentLib.slicer_logic`` (no qt; tested headless on slicer-core), which runs the GMSSegment engine command line
as a background worker and imports its results as segmentation nodes. The widget polls the running job with a
``qt.QTimer``; nothing here waits on the worker.
"""
import contextlib
import enum
import logging
import os
import pathlib
import re
import shutil
from typing import Optional

import ctk
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.util import VTKObservationMixin

from GMSSegmentLib import dependencies, slicer_logic

from slicer.i18n import tr as _
from slicer.i18n import translate


SETTINGS_WEIGHTS = "GMSSegment/FoundationWeightsFolder"
SETTINGS_MODEL = "GMSSegment/LastModelFolder"
POLL_INTERVAL_MS = 100


#
# GMSSegment
#


class GMSSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("GMS Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []  # PyTorch comes from the PyTorch extension (an extension dependency)
        self.parent.contributors = ["GMSSegment team (GMSSegment project)"]
        self.parent.helpText = _(
            "Segment 2D images and 3D volumes with Generative Medical Segmentation (GMS): a frozen foundation "
            "autoencoder and a small latent mapping model trained for the task. Choose a volume and a model folder, "
            "then click Segment. The result is a new segmentation (or new segments of the chosen one) that can be "
            "edited in Segment Editor. Segmentation runs in a background process; the application stays responsive "
            "and Cancel stops it at once. See "
            '<a href="https://github.com/gmssegment/SlicerGMSSegment">the documentation</a>.'
        )
        self.parent.acknowledgementText = _(
            "GMS was published by Huang et al., \"Generative Medical Segmentation\" (AAAI 2025, arXiv 2403.18198). "
            "Models are trained on public data sets; see each model card for data, licence and citation."
        )


#
# Parameter node
#


class Device(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self):
        return {"auto": _("Automatic"), "cpu": _("CPU"), "cuda": _("GPU (CUDA)")}[self.value]


class SlicingAxis(enum.Enum):
    MODEL = "model"
    AXIS0 = "0"
    AXIS1 = "1"
    AXIS2 = "2"

    def label(self):
        return {
            "model": _("From the model card"),
            "0": _("0: slices across K (usually axial)"),
            "1": _("1: slices across J (usually coronal)"),
            "2": _("2: slices across I (usually sagittal)"),
        }[self.value]

    def axisIndex(self):
        return None if self is SlicingAxis.MODEL else int(self.value)


def userModelsDirectory() -> str:
    """Where models adapted in Slicer are saved: ``GMSSegment/Models`` beside Slicer's user settings."""
    with_settings = getattr(slicer.app, "slicerUserSettingsFilePath", "") if hasattr(slicer, "app") else ""
    base = os.path.dirname(with_settings) if with_settings else os.path.join(os.path.expanduser("~"), ".GMSSegment")
    return os.path.join(base, "GMSSegment", "Models")


def addUserModelsToSearchPath() -> str:
    """Put the user models folder on the model search path (``GMS_MODELS_DIR``) of this process and its workers, so
    adapted models are listed and found by name. Returns the folder."""
    folder = userModelsDirectory()
    paths = [p for p in os.environ.get("GMS_MODELS_DIR", "").split(os.pathsep) if p]
    if folder not in paths:
        os.environ["GMS_MODELS_DIR"] = os.pathsep.join(paths + [folder])
    return folder


def _defaultModelPath():
    """Last used model folder, else the first model installed with the extension, else empty."""
    last = qt.QSettings().value(SETTINGS_MODEL, "")
    if last and os.path.isdir(str(last)):
        return pathlib.Path(str(last))
    models = slicer_logic.findModels()
    return pathlib.Path(models[0][1]) if models else pathlib.Path()


@parameterNodeWrapper
class GMSSegmentParameterNode:
    """
    inputVolume - the volume to segment (scalar or RGB vector volume).
    modelPath - the GMS model folder (card.json + model.safetensors).
    device - where the worker runs the model.
    axis - slicing axis override (numpy K/J/I order).
    testTimeAugmentation - use the model card's test-time augmentation (chosen on validation; slower).
    outputSegmentation - existing segmentation to add segments to; None creates a new node each run.
    uncertaintyMap - also import each result's uncertainty map, shown over the image.
    uncertaintyOpacity - the map's opacity in the slice views.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelPath: pathlib.Path
    device: Device = Device.AUTO
    axis: SlicingAxis = SlicingAxis.MODEL
    testTimeAugmentation: bool = True
    outputSegmentation: vtkMRMLSegmentationNode
    uncertaintyMap: bool = True
    uncertaintyOpacity: float = 0.4


def _pathOrNone(path) -> Optional[str]:
    text = str(path) if path is not None else ""
    return None if text.strip() in ("", ".") else text


#
# Dependencies (installed on request, never at import time)
#


def ensureDependencies(model=None, askConfirmation=True) -> bool:
    """Make sure the worker's Python packages are installed in Slicer's Python. Returns True when they are; else the
    user has been told why in one dialog (or declined the one confirmation) and False is returned: nothing raises, the
    GUI stays as it was.

    As TotalSegmentator's extension does, one confirmation lists everything to install, PyTorch included; then
    PyTorch comes from the PyTorch extension (``PyTorchUtils.PyTorchUtilsLogic.installTorch``, with the minimum
    version) and the other packages from ``slicer.packaging.pip_ensure`` (Slicer 5.12 and later, its own prompt
    off) or ``slicer.util.pip_install`` (5.8, 5.10). A PyTorch older than the minimum is not replaced in the running
    application: the user is told to upgrade it in the PyTorch Utils module. While Slicer runs its tests
    (``--testing``) nothing is installed.
    """
    plan = dependencies.installPlan(slicer_logic.requirementsForModel(model))
    if plan.complete:
        return True
    if plan.torchTooOld:
        slicer.util.errorDisplay(
            _("PyTorch {installed} is installed, but GMS Segment needs PyTorch {required}. Upgrade it in the "
              "PyTorch Utils module (version requirement '{required}', then Install), restart Slicer, and try "
              "again.").format(installed=plan.torchTooOld, required=plan.torchVersionRequirement))
        return False
    if slicer.app.testingEnabled():
        logging.info("GMSSegment: testing mode, not installing " + ", ".join(plan.packages))
        return False
    torchLogic = None
    if plan.torch:
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay(
                _("GMS Segment needs PyTorch. Please install the 'PyTorch' extension from the Extensions Manager, "
                  "restart Slicer, and try again."))
            return False
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("GMS Segment needs these Python packages, which will now be downloaded and installed into Slicer's "
              "Python. This needs a network connection and may take several minutes.") + "\n\n" +
            "\n".join(plan.packages), _("Install Python packages")):
        return False
    try:
        if torchLogic is not None:
            with slicer.util.WaitCursor():
                torch = torchLogic.installTorch(askConfirmation=False,
                                                torchVersionRequirement=plan.torchVersionRequirement)
            if torch is None:
                raise RuntimeError(_("PyTorch was not installed"))
        if plan.pip:
            try:
                import slicer.packaging as packaging  # Slicer 5.12 and later: installs with a progress dialog
            except ImportError:
                packaging = None
            if packaging is not None and hasattr(packaging, "pip_ensure"):
                packaging.pip_ensure(plan.pip, prompt_install=False, requester="GMSSegment")
            else:
                with slicer.util.WaitCursor():
                    slicer.util.pip_install(plan.pip)
    except Exception as e:  # pip's or light-the-torch's CalledProcessError, a declined prompt, ...
        logging.exception("GMSSegment: installing Python packages failed")
        import traceback

        slicer.util.errorDisplay(_("Installing the Python packages GMS Segment needs failed: {error}").format(
            error=e), detailedText=traceback.format_exc())
        return False
    still = slicer_logic.missingRequirements(plan.requirements)
    if still:
        slicer.util.errorDisplay(_("These Python packages are still missing: ") + ", ".join(still))
        return False
    return True


#
# GMSSegmentWidget
#


class GMSSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._timer = None
        self._tableTasks = []  # the batch table's tasks, row by row
        self._reviewVolumeID = None  # the volume "Next uncertain slice" moves through, and its slice shown last
        self._reviewSlice = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/GMSSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = GMSSegmentLogic()
        addUserModelsToSearchPath()

        self.ui.modelPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.weightsPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.weightsPathLineEdit.currentPath = qt.QSettings().value(SETTINGS_WEIGHTS, "")
        self.ui.batchStatusTable.setHorizontalHeaderLabels([_("Volume"), _("Status"), _("Review")])
        self.ui.progressBar.setValue(0)
        self._populateModels()

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.segmentAllButton.connect("clicked(bool)", self.onSegmentAllButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.adaptButton.connect("clicked(bool)", self.onAdaptButton)
        self.ui.nextUncertainButton.connect("clicked(bool)", self.onNextUncertainButton)
        self.ui.uncertaintyOpacitySlider.connect("valueChanged(double)", self.onUncertaintyOpacityChanged)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelComboBoxChanged)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.weightsPathLineEdit.connect("currentPathChanged(QString)", self.onWeightsPathChanged)

        self.initializeParameterNode()
        self._updateRunningState()

    def cleanup(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        if self.logic is not None:
            self.logic.shutdown()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        if self.logic is not None and self.logic.running:
            self.logic.cancel()  # its nodes are about to disappear
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            volumes = self.logic.loadedVolumes(slicer.mrmlScene)
            if volumes:
                self._parameterNode.inputVolume = volumes[0]
        if _pathOrNone(self._parameterNode.modelPath) is None:
            default = _defaultModelPath()
            if _pathOrNone(default):
                self._parameterNode.modelPath = default

    def setParameterNode(self, inputParameterNode: Optional[GMSSegmentParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # In the .ui file, the dynamic property "SlicerParameterName" connects widgets to parameters.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        running = self.logic is not None and self.logic.running
        p = self._parameterNode
        hasModel = p is not None and _pathOrNone(p.modelPath) is not None
        if running:
            self.ui.segmentButton.toolTip = _("A segmentation is running")
            self.ui.segmentButton.enabled = False
        elif p and p.inputVolume and hasModel:
            self.ui.segmentButton.toolTip = _("Segment the input volume in the background")
            self.ui.segmentButton.enabled = True
        else:
            self.ui.segmentButton.toolTip = _("Select an input volume and a model folder")
            self.ui.segmentButton.enabled = False
        self.ui.segmentAllButton.enabled = (not running) and hasModel
        self.ui.adaptButton.enabled = (not running) and hasModel
        self._updateModelInfo()

    # -- models -----------------------------------------------------------------------------------------------------
    def _populateModels(self) -> None:
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("(choose a folder below)"), "")
        for name, folder in slicer_logic.findModels():
            combo.addItem(name, folder)
        combo.blockSignals(wasBlocked)

    def onModelComboBoxChanged(self, index) -> None:
        folder = self.ui.modelComboBox.itemData(index)
        if folder and self._parameterNode is not None:
            self._parameterNode.modelPath = pathlib.Path(folder)

    def onModelPathChanged(self, path) -> None:
        combo = self.ui.modelComboBox
        index = max(0, combo.findData(os.path.abspath(path)) if path else 0)
        wasBlocked = combo.blockSignals(True)
        combo.setCurrentIndex(index)
        combo.blockSignals(wasBlocked)
        self._updateModelInfo()

    def onWeightsPathChanged(self, path) -> None:
        qt.QSettings().setValue(SETTINGS_WEIGHTS, path or "")

    def _updateModelInfo(self) -> None:
        p = self._parameterNode
        model = _pathOrNone(p.modelPath) if p else None
        if not model:
            self.ui.modelInfoLabel.text = ""
            return
        try:
            card = slicer_logic.readModelCard(model)
        except ValueError as e:
            self.ui.modelInfoLabel.text = str(e)
            return
        self.ui.modelInfoLabel.text = slicer_logic.modelSummary(card, os.path.basename(model))
        self.ui.modelInfoLabel.toolTip = slicer_logic.resolveModel(model)

    # -- running ----------------------------------------------------------------------------------------------------
    def _options(self) -> dict:
        """The user's choices; the model resolved and its card read once for the click (as chosen if that fails: the
        logic then says why)."""
        p = self._parameterNode
        model = _pathOrNone(p.modelPath)
        with contextlib.suppress(ValueError):
            model = slicer_logic.openModel(model)
        return {
            "model": model,
            "device": p.device.value,
            "axis": p.axis.axisIndex(),
            "tta": bool(p.testTimeAugmentation),
            "uncertaintyMap": bool(p.uncertaintyMap),
            "weightsDir": _pathOrNone(self.ui.weightsPathLineEdit.currentPath),
        }

    def onSegmentButton(self) -> None:
        p = self._parameterNode
        options = self._options()
        if not ensureDependencies(options["model"]):
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            job = self.logic.start(p.inputVolume, outputSegmentationNode=p.outputSegmentation, **options)
            qt.QSettings().setValue(SETTINGS_MODEL, _pathOrNone(p.modelPath))
            self._startPolling(job)

    def onSegmentAllButton(self) -> None:
        combo = self.ui.batchVolumesComboBox
        volumes = [n for n in combo.checkedNodes() if self.logic.isSegmentableVolume(n)]
        if not volumes:
            volumes = self.logic.loadedVolumes(slicer.mrmlScene)
        if not volumes:
            slicer.util.errorDisplay(_("There is no volume to segment. Load some volumes first."))
            return
        options = self._options()
        if not ensureDependencies(options["model"]):
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the batch segmentation."), waitCursor=True):
            job = self.logic.start(volumes, **options)
            qt.QSettings().setValue(SETTINGS_MODEL, _pathOrNone(self._parameterNode.modelPath))
            self._startPolling(job)

    def onAdaptButton(self) -> None:
        model = _pathOrNone(self._parameterNode.modelPath)
        request = None
        with slicer.util.tryWithErrorDisplay(_("Failed to start adapting the model."), waitCursor=True):
            opened = slicer_logic.openModel(model)  # resolved and its card read once for the click
            card = opened.card
            names = [str(seg.name) for seg in card.segments or []]
            pairs = self.logic.trainingPairs(slicer.mrmlScene, names, dimension=int(card.dimension or 3))
            checked = {n.GetID() for n in self.ui.adaptSegmentationsComboBox.checkedNodes()}
            if checked:
                pairs = [(volume, seg) for volume, seg in pairs if seg.GetID() in checked]
            if len(pairs) < 2:
                raise ValueError(_("Adapting needs at least 2 segmentations that have the segments {names} and a "
                                   "loaded reference volume; found {n}.").format(names=", ".join(names), n=len(pairs)))
            name = self.ui.adaptNameLineEdit.text.strip() or f"{card.name or os.path.basename(model)}-adapted"
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
                raise ValueError(_("The model name may hold only letters, digits, '.', '_' and '-': {name}").format(
                    name=name))
            request = (pairs, names, os.path.join(addUserModelsToSearchPath(), name))
        if request is None or not ensureDependencies(opened):  # may ask the user: no wait cursor here
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start adapting the model."), waitCursor=True):
            pairs, names, output = request
            job = self.logic.startTraining(pairs, names, output, initFrom=opened,
                                           maxMinutes=self.ui.adaptMinutesSpinBox.value,
                                           weightsDir=_pathOrNone(self.ui.weightsPathLineEdit.currentPath))
            self._startPolling(job)

    def onCancelButton(self) -> None:
        if self.logic is not None:
            self.logic.cancel()
        self.ui.statusLabel.text = _("Cancelling...")
        self.ui.cancelButton.enabled = False

    def _startPolling(self, job) -> None:
        self._job = job
        self._reviewVolumeID = self._reviewSlice = None
        self._updateReview(None)
        self.ui.logTextEdit.clear()
        for line in job.poll():
            self.ui.logTextEdit.appendPlainText(line)
        self.ui.progressBar.setValue(0)
        self._fillBatchTable(job)
        self._updateRunningState()
        self._timer.start()

    def onPollTimer(self) -> None:
        """Called every POLL_INTERVAL_MS while a job runs: never blocks (the logic reads the worker in threads)."""
        job = self._job
        if job is None:
            self._timer.stop()
            return
        try:
            lines = job.poll()
        except Exception as e:  # never let the timer die silently
            logging.exception("GMSSegment: polling failed")
            lines = [f"Error: {e}"]
        for line in lines:
            self.ui.logTextEdit.appendPlainText(line)
        self.ui.progressBar.setValue(int(round(1000 * job.progress)))
        self.ui.statusLabel.text = job.statusText
        self._fillBatchTable(job)
        if job.finished:
            self._timer.stop()
            self._updateRunningState()
            self._onJobFinished(job)

    def _onJobFinished(self, job) -> None:
        if isinstance(job, slicer_logic.TrainingJob):
            if job.state == slicer_logic.JobState.SUCCEEDED and job.refused:
                slicer.util.infoDisplay(job.statusText, detailedText="\n".join(job.log[-40:]))
            elif job.state == slicer_logic.JobState.SUCCEEDED:
                if job.estimate is not None and not slicer.util.confirmYesNoDisplay(
                        job.statusText + "\n\n" + _("Keep the adapted model and select it?")):
                    shutil.rmtree(job.modelDir, ignore_errors=True)
                    self.ui.statusLabel.text = _("The adapted model was discarded.")
                    return
                self._populateModels()
                self._parameterNode.modelPath = pathlib.Path(job.modelDir)
                slicer.util.infoDisplay(job.statusText + "\n" + _("It is now the selected model."))
            elif job.state == slicer_logic.JobState.FAILED:
                slicer.util.errorDisplay(_("Adapting the model failed: ") + job.errorMessage,
                                         detailedText="\n".join(job.log[-40:]))
            return
        if job.state in (slicer_logic.JobState.SUCCEEDED, slicer_logic.JobState.PARTIAL):
            if not job.batch:
                self._showResult(job.tasks[0], fit=True)
            else:
                self._updateReview(self._reviewTask())
        if job.state == slicer_logic.JobState.FAILED:
            slicer.util.errorDisplay(_("Segmentation failed: ") + job.errorMessage,
                                     detailedText="\n".join(job.log[-40:]))
        elif job.state == slicer_logic.JobState.PARTIAL:
            slicer.util.warningDisplay(_("Some volumes could not be segmented: ") + job.errorMessage)

    # -- review: the uncertainty map and the slices to look at --------------------------------------------------------
    def _reviewTask(self):
        """The result to review: a single job's, or the batch table's selected row (else its first, the most
        uncertain)."""
        job = self._job
        if not isinstance(job, slicer_logic.SegmentationJob) or not job.finished:
            return None
        done = [t for t in job.tasks if t.state == slicer_logic.TaskState.SUCCEEDED]
        if not job.batch:
            return done[0] if done else None
        rows = self._tableTasks
        selected = self.ui.batchStatusTable.selectionModel().selectedRows()
        if selected and selected[0].row() < len(rows) and rows[selected[0].row()] in done:
            return rows[selected[0].row()]
        ordered = [t for t in rows if t in done]
        return ordered[0] if ordered else None

    def _showResult(self, task, fit: bool = False) -> None:
        """The task's volume in the slice views, with its uncertainty map over it (when there is one)."""
        volumeNode = slicer.mrmlScene.GetNodeByID(task.volumeNodeID)
        if volumeNode is None:
            return
        mapNode = slicer.mrmlScene.GetNodeByID(task.uncertaintyNodeID) if task.uncertaintyNodeID else None
        if mapNode is not None:
            slicer.util.setSliceViewerLayers(background=volumeNode, foreground=mapNode,
                                             foregroundOpacity=self._parameterNode.uncertaintyOpacity, fit=fit)
        else:
            slicer.util.setSliceViewerLayers(background=volumeNode, fit=fit)
        self._reviewVolumeID, self._reviewSlice = task.volumeNodeID, None
        self._updateReview(task)

    def _updateReview(self, task) -> None:
        order = slicer_logic.uncertainSlices(task) if task is not None else []
        self.ui.nextUncertainButton.enabled = bool(order)
        if task is None or task.uncertainty is None:
            self.ui.reviewLabel.text = ""
            return
        text = _("Review score {score:.2f} (0 = sure)").format(score=task.uncertainty)
        if order:
            text += _("; {n} slices to look at").format(n=len(order))
        self.ui.reviewLabel.text = text

    def onNextUncertainButton(self) -> None:
        task = self._reviewTask()
        if task is None:
            return
        if self._reviewVolumeID != task.volumeNodeID:
            self._showResult(task)
        index = slicer_logic.nextUncertainSlice(task, self._reviewSlice)
        if index is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot move to the slice."), waitCursor=False):
            slicer_logic.jumpToSlice(slicer.mrmlScene, task, index)
            self._reviewSlice = index
            score = task.sliceUncertainty[index]
            self.ui.reviewLabel.text = _("Slice {k} of {n}: score {score:.2f}").format(
                k=index + 1, n=len(task.sliceUncertainty), score=score)

    def onUncertaintyOpacityChanged(self, value) -> None:
        for name in ("Red", "Yellow", "Green"):
            widget = slicer.app.layoutManager().sliceWidget(name) if slicer.app.layoutManager() else None
            if widget is not None:
                widget.sliceLogic().GetSliceCompositeNode().SetForegroundOpacity(value)

    def _fillBatchTable(self, job) -> None:
        table = self.ui.batchStatusTable
        if not job.batch:
            return
        # while running, in the order of the batch; once finished, the most uncertain results first
        self._tableTasks = slicer_logic.reviewOrder(job.tasks) if job.finished else list(job.tasks)
        table.setRowCount(len(job.tasks))
        for row, task in enumerate(self._tableTasks):
            status = task.state
            if task.state == slicer_logic.TaskState.RUNNING and task.total:
                status = f"{task.state} {task.done}/{task.total}"
            if task.message and task.state == slicer_logic.TaskState.FAILED:
                status = f"{task.state}: {task.message}"
            elif task.state == slicer_logic.TaskState.SUCCEEDED and task.notFound:
                status = f"{task.state}: {task.foundText}"
            review = f"{task.uncertainty:.2f}" if task.uncertainty is not None else ""
            for column, text in enumerate((task.volumeName, status, review)):
                item = table.item(row, column)
                if item is None:
                    item = qt.QTableWidgetItem()
                    table.setItem(row, column, item)
                item.setText(text)
                item.setToolTip(text)

    def _updateRunningState(self) -> None:
        running = self.logic is not None and self.logic.running
        self.ui.cancelButton.enabled = running
        for widget in (self.ui.inputsCollapsibleButton, self.ui.outputsCollapsibleButton,
                       self.ui.advancedCollapsibleButton, self.ui.batchVolumesComboBox,
                       self.ui.adaptCollapsibleButton):
            widget.enabled = not running
        self._checkCanApply()


#
# GMSSegmentLogic
#


class GMSSegmentLogic(ScriptedLoadableModuleLogic, slicer_logic.SegmentationLogic):
    """The module's logic: the parameter node plus everything from ``GMSSegmentLib.slicer_logic.SegmentationLogic``
    (``start``, ``segment``, ``cancel``, ``loadedVolumes``...), usable from the Python console without the widget::

        logic = slicer.util.getModuleLogic("GMSSegment")
        job = logic.segment(slicer.util.getNode("MRHead"), "/path/to/model", device="cpu")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        slicer_logic.SegmentationLogic.__init__(self, scene=None)

    def getParameterNode(self):
        return GMSSegmentParameterNode(super().getParameterNode())


#
# GMSSegmentTest
#


class GMSSegmentTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: segments a volume made here with a model bundled with the extension, and cancels a run.

    It installs nothing and downloads no sample data; only the pinned foundation weights may be downloaded (a few MB,
    SHA-256 checked). Where the worker's Python packages or the weights cannot be had, a test says so in one line and
    is skipped: unittest's runner (ctest, ``--testing``) reports the skip, and :meth:`runTest` (Reload and Test, which
    calls it directly, outside any runner) shows the line and goes on instead of failing.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        import unittest

        for test in (self.test_GMSSegment_parameterNode, self.test_GMSSegment_segmentSample,
                     self.test_GMSSegment_cancel):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as e:
                self.delayDisplay(f"{test.__name__} skipped: {e}")

    def _model(self):
        """The bundled busi-lesion model (2D: quick on a CPU), with what it needs to run, or a skip saying what is
        missing."""
        folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "Models", "busi-lesion")
        if not os.path.isfile(os.path.join(folder, "card.json")):
            self.skipTest(f"the bundled model is missing ({folder})")
        missing = slicer_logic.missingRequirements(slicer_logic.requirementsForModel(folder))
        if missing:
            self.skipTest("the worker's Python packages are not installed (" + ", ".join(missing) + "), and the "
                          "self-test installs nothing: segment once from the module, then test again")
        from GMSSegmentLib import GMSError, weights

        foundation = slicer_logic.readModelCard(folder).foundation
        try:
            weights.resolve_weights(foundation.name, progress=lambda done, total: None)
        except (GMSError, OSError) as e:
            self.skipTest(f"the foundation weights cannot be had: {e}")
        return folder

    def _testVolume(self, slices=1):
        """An 8-bit ultrasound-like volume made here: a dark round lesion in brighter speckle, on every slice."""
        import numpy as np

        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:160, 0:160]
        lesion = (yy - 80) ** 2 / 30 ** 2 + (xx - 70) ** 2 / 40 ** 2 < 1
        frames = []
        for _k in range(slices):
            frame = rng.normal(120, 25, (160, 160))
            frame[lesion] = rng.normal(35, 10, int(lesion.sum()))
            frames.append(np.clip(frame, 0, 255).astype(np.uint8))
        return slicer.util.addVolumeFromArray(np.stack(frames), name="GMSSegmentTestVolume")

    def _waitForJob(self, job, timeout=900):
        import time

        deadline = time.monotonic() + timeout
        while not job.finished and time.monotonic() < deadline:
            job.poll()
            slicer.app.processEvents()
            time.sleep(0.05)
        if not job.finished:
            job.cancel()
            job.wait(10)
            self.fail(f"segmentation did not finish within {timeout} s")

    def test_GMSSegment_parameterNode(self):
        self.delayDisplay("Parameter node")
        logic = GMSSegmentLogic()
        p = logic.getParameterNode()
        self.assertEqual(p.device, Device.AUTO)
        self.assertEqual(p.axis, SlicingAxis.MODEL)
        self.assertIsNone(p.axis.axisIndex())
        self.assertEqual(SlicingAxis.AXIS2.axisIndex(), 2)
        self.delayDisplay("Parameter node test passed")

    def test_GMSSegment_segmentSample(self):
        self.delayDisplay("Segmenting a volume with a bundled model")
        model = self._model()
        card = slicer_logic.readModelCard(model)
        volume = self._testVolume()
        before = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
        logic = GMSSegmentLogic()
        job = logic.start(volume, model, device="auto")
        self._waitForJob(job)
        self.assertEqual(job.state, slicer_logic.JobState.SUCCEEDED, job.errorMessage)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), before + 1)
        segmentationNode = job.segmentationNodes[0]
        segmentation = segmentationNode.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        self.assertEqual(names, [s.name for s in card.segments])
        self.assertEqual(segmentationNode.GetNodeReference(
            slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()), volume)
        self.delayDisplay("Segmentation test passed")

    def test_GMSSegment_cancel(self):
        self.delayDisplay("Cancelling a segmentation")
        model = self._model()
        volume = self._testVolume(slices=40)
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        logic = GMSSegmentLogic()
        job = logic.start(volume, model, device="cpu")
        slicer.app.processEvents()
        job.cancel()
        self._waitForJob(job, timeout=30)
        self.assertEqual(job.state, slicer_logic.JobState.CANCELLED)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.assertFalse(os.path.exists(job.tempDir))
        self.delayDisplay("Cancel test passed")
