"""Stand-in MRML scene and nodes with the semantics of Slicer 5.10 that the module relies on (see README.md)."""

from __future__ import annotations

import numpy as np
import vtk


class vtkMRMLNode:
    def __init__(self) -> None:
        self._id, self._name, self._scene = "", "", None
        self._attributes: dict[str, str] = {}
        self._references: dict[str, str] = {}

    def GetID(self) -> str:
        return self._id

    def GetName(self) -> str:
        return self._name

    def SetName(self, name: str) -> None:
        self._name = name

    def GetScene(self):
        return self._scene

    def SetAttribute(self, name: str, value: str) -> None:
        self._attributes[name] = str(value)

    def GetAttribute(self, name: str) -> str | None:
        return self._attributes.get(name)

    def RemoveAttribute(self, name: str) -> None:
        self._attributes.pop(name, None)

    def SetNodeReferenceID(self, role: str, nodeId: str | None) -> None:
        if nodeId:
            self._references[role] = nodeId
        else:
            self._references.pop(role, None)

    def GetNodeReferenceID(self, role: str) -> str | None:
        return self._references.get(role)

    def GetNodeReference(self, role: str):
        nodeId = self._references.get(role)
        return self._scene.GetNodeByID(nodeId) if nodeId and self._scene else None

    def IsA(self, className: str) -> bool:
        return any(cls.__name__ == className for cls in type(self).__mro__)

    def Modified(self) -> None:
        pass


class vtkMRMLLinearTransformNode(vtkMRMLNode):
    def __init__(self) -> None:
        super().__init__()
        self._toParent = np.eye(4)

    def SetMatrixTransformToParent(self, matrix: vtk.vtkMatrix4x4) -> None:
        self._toParent = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])

    def IsTransformToWorldLinear(self) -> bool:
        return True

    def GetMatrixTransformToWorld(self, matrix: vtk.vtkMatrix4x4) -> None:
        for r in range(4):
            for c in range(4):
                matrix.SetElement(r, c, self._toParent[r, c])


class vtkMRMLTransformableNode(vtkMRMLNode):
    def SetAndObserveTransformNodeID(self, nodeId: str | None) -> None:
        self.SetNodeReferenceID("transform", nodeId)

    def GetTransformNodeID(self) -> str | None:
        return self.GetNodeReferenceID("transform")

    def GetParentTransformNode(self):
        return self.GetNodeReference("transform")


class vtkMRMLScalarVolumeNode(vtkMRMLTransformableNode):
    """Keeps origin, spacing and directions like vtkMRMLVolumeNode; the image data itself has unit geometry."""

    def __init__(self) -> None:
        super().__init__()
        self._image = None
        self._origin = np.zeros(3)
        self._spacing = np.ones(3)
        self._directions = np.eye(3)  # columns: RAS direction of i, j, k

    def SetAndObserveImageData(self, image: vtk.vtkImageData) -> None:
        self._image = image

    def GetImageData(self):
        return self._image

    def SetIJKToRASMatrix(self, matrix: vtk.vtkMatrix4x4) -> None:
        array = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        self._spacing = np.linalg.norm(array[:3, :3], axis=0)
        self._directions = array[:3, :3] / self._spacing
        self._origin = array[:3, 3].copy()

    def GetIJKToRASMatrix(self, matrix: vtk.vtkMatrix4x4) -> None:
        array = np.eye(4)
        array[:3, :3] = self._directions * self._spacing
        array[:3, 3] = self._origin
        for r in range(4):
            for c in range(4):
                matrix.SetElement(r, c, array[r, c])

    def GetSpacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self._spacing)

    def CreateDefaultDisplayNodes(self) -> None:
        if getattr(self, "_display", None) is None:
            self._display = vtkMRMLScalarVolumeDisplayNode()

    def GetDisplayNode(self):
        return getattr(self, "_display", None)

    def GetOrigin(self) -> tuple[float, float, float]:
        return tuple(float(o) for o in self._origin)


class vtkMRMLScalarVolumeDisplayNode(vtkMRMLNode):
    """Colour node, window/level and threshold of a scalar volume's display, as set (nothing is drawn)."""

    def __init__(self) -> None:
        super().__init__()
        self._colour, self._auto, self._window, self._threshold = None, True, None, [False, 0.0, 0.0]

    def SetAndObserveColorNodeID(self, nodeId: str) -> None:
        self._colour = nodeId

    def GetColorNodeID(self) -> str | None:
        return self._colour

    def SetAutoWindowLevel(self, automatic: bool) -> None:
        self._auto = bool(automatic)

    def GetAutoWindowLevel(self) -> bool:
        return self._auto

    def SetWindowLevelMinMax(self, minimum: float, maximum: float) -> None:
        self._window = (float(minimum), float(maximum))

    def GetWindowLevelMin(self) -> float:
        return self._window[0]

    def GetWindowLevelMax(self) -> float:
        return self._window[1]

    def SetApplyThreshold(self, apply: bool) -> None:
        self._threshold[0] = bool(apply)

    def GetApplyThreshold(self) -> bool:
        return self._threshold[0]

    def SetLowerThreshold(self, value: float) -> None:
        self._threshold[1] = float(value)

    def GetLowerThreshold(self) -> float:
        return self._threshold[1]

    def SetUpperThreshold(self, value: float) -> None:
        self._threshold[2] = float(value)

    def GetUpperThreshold(self) -> float:
        return self._threshold[2]


class vtkMRMLTableNode(vtkMRMLNode):
    def __init__(self) -> None:
        super().__init__()
        self._table = vtk.vtkTable()
        self._descriptions: dict[str, str] = {}
        self._locked = False

    def SetAndObserveTable(self, table: vtk.vtkTable) -> None:
        self._table = table

    def GetTable(self) -> vtk.vtkTable:
        return self._table

    def GetNumberOfRows(self) -> int:
        return self._table.GetNumberOfRows()

    def GetNumberOfColumns(self) -> int:
        return self._table.GetNumberOfColumns()

    def GetColumnIndex(self, name: str) -> int:
        for index in range(self._table.GetNumberOfColumns()):
            if self._table.GetColumn(index).GetName() == name:
                return index
        return -1

    def GetCellText(self, row: int, column: int) -> str:
        return self._table.GetValue(row, column).ToString()

    def SetColumnDescription(self, name: str, description: str) -> None:
        self._descriptions[name] = description

    def GetColumnDescription(self, name: str) -> str:
        return self._descriptions.get(name, "")

    def SetLocked(self, locked: bool) -> None:
        self._locked = bool(locked)

    def GetLocked(self) -> bool:
        return self._locked


class vtkMRMLScriptedModuleNode(vtkMRMLNode):
    def __init__(self) -> None:
        super().__init__()
        self._parameters: dict[str, str] = {}
        self._singletonTag = None

    def SetParameter(self, name: str, value: str) -> None:
        self._parameters[name] = str(value)

    def GetParameter(self, name: str) -> str:
        return self._parameters.get(name, "")

    def HasParameter(self, name: str) -> bool:
        return name in self._parameters

    def UnsetParameter(self, name: str) -> None:
        self._parameters.pop(name, None)

    def SetSingletonTag(self, tag: str) -> None:
        self._singletonTag = tag

    def GetSingletonTag(self) -> str | None:
        return self._singletonTag


class vtkMRMLLayoutNode(vtkMRMLNode):
    SlicerLayoutFourUpTableView = 35


class vtkMRMLTextNode(vtkMRMLNode):
    """Text saved with the scene (Slicer writes it to a .txt file)."""

    def __init__(self) -> None:
        super().__init__()
        self._text = ""

    def SetText(self, text: str) -> None:
        self._text = str(text)

    def GetText(self) -> str:
        return self._text


class vtkSegment:
    """Name, colour (0..1), string tags; the terminology entry is the tag 'TerminologyEntry', as in Slicer."""

    def __init__(self) -> None:
        self._name, self._color, self._tags = "", (0.5, 0.5, 0.5), {}

    def SetName(self, name: str) -> None:
        self._name = name

    def GetName(self) -> str:
        return self._name

    def SetColor(self, r, g=None, b=None) -> None:
        self._color = tuple(float(c) for c in (r if g is None else (r, g, b)))

    def GetColor(self) -> tuple[float, float, float]:
        return self._color

    def SetTag(self, tag: str, value) -> None:
        self._tags[tag] = str(value)

    def GetTag(self, tag: str, value: vtk.reference) -> bool:
        """Like the wrapped C++ GetTag(tag, std::string&): fills `value` (a vtk.reference), True when present."""
        if tag not in self._tags:
            return False
        value.set(self._tags[tag])
        return True

    def HasTag(self, tag: str) -> bool:
        return tag in self._tags

    @staticmethod
    def GetTerminologyEntryTagName() -> str:
        return "TerminologyEntry"

    def SetTerminology(self, entry: str) -> None:
        self.SetTag(self.GetTerminologyEntryTagName(), entry)

    def GetTerminology(self) -> str:
        return self._tags.get(self.GetTerminologyEntryTagName(), "")


class vtkSegmentation:
    """Ordered segments by id. Each segment's binary labelmap is kept as a (k, j, i) bool array with its
    IJK-to-RAS matrix (`_labelmaps`), which the stand-in's slicer.util segment array functions read and write."""

    def __init__(self) -> None:
        self._segments: dict[str, vtkSegment] = {}
        self._labelmaps: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def AddEmptySegment(self, segmentId: str = "", segmentName: str = "", color=None) -> str:
        segmentId = segmentId or f"Segment_{len(self._segments) + 1}"
        segment = vtkSegment()
        segment.SetName(segmentName or segmentId)
        if color is not None:
            segment.SetColor(*color)
        self._segments[segmentId] = segment
        return segmentId

    def GetSegment(self, segmentId: str) -> vtkSegment | None:
        return self._segments.get(segmentId)

    def GetNumberOfSegments(self) -> int:
        return len(self._segments)

    def GetNthSegmentID(self, index: int) -> str:
        return list(self._segments)[index]

    def GetSegmentIdBySegmentName(self, name: str) -> str:
        """The first segment with this name, case-insensitive as in Slicer; '' when none."""
        return next((i for i, s in self._segments.items() if s.GetName().lower() == name.lower()), "")


class vtkMRMLSegmentationDisplayNode(vtkMRMLNode):
    def __init__(self) -> None:
        super().__init__()
        self._opacity3D: dict[str, float] = {}
        self._opacity2DFill: dict[str, float] = {}

    def SetSegmentOpacity3D(self, segmentId: str, opacity: float) -> None:
        self._opacity3D[segmentId] = float(opacity)

    def GetSegmentOpacity3D(self, segmentId: str) -> float:
        return self._opacity3D.get(segmentId, 1.0)

    def SetSegmentOpacity2DFill(self, segmentId: str, opacity: float) -> None:
        self._opacity2DFill[segmentId] = float(opacity)

    def GetSegmentOpacity2DFill(self, segmentId: str) -> float:
        return self._opacity2DFill.get(segmentId, 1.0)


class vtkMRMLSegmentationNode(vtkMRMLTransformableNode):
    def __init__(self) -> None:
        super().__init__()
        self._segmentation = vtkSegmentation()

    def GetSegmentation(self) -> vtkSegmentation:
        return self._segmentation

    def CreateDefaultDisplayNodes(self) -> None:
        if self.GetNodeReference("display") is None:
            display = self._scene.AddNewNodeByClass("vtkMRMLSegmentationDisplayNode")
            self.SetNodeReferenceID("display", display.GetID())

    def GetDisplayNode(self):
        return self.GetNodeReference("display")

    def SetReferenceImageGeometryParameterFromVolumeNode(self, volumeNode) -> None:
        self.SetNodeReferenceID("referenceImageGeometryRef", volumeNode.GetID())


NODE_CLASSES = {cls.__name__: cls for cls in (vtkMRMLScalarVolumeNode, vtkMRMLTableNode, vtkMRMLScriptedModuleNode,
                                              vtkMRMLLinearTransformNode, vtkMRMLLayoutNode, vtkMRMLSegmentationNode,
                                              vtkMRMLSegmentationDisplayNode, vtkMRMLTextNode)}


class vtkMRMLScene:
    StartCloseEvent, EndCloseEvent = 66000, 66001

    def __init__(self) -> None:
        self._nodes: dict[str, vtkMRMLNode] = {}
        self._counter = 0

    def AddNode(self, node: vtkMRMLNode) -> vtkMRMLNode:
        self._counter += 1
        node._id = f"{type(node).__name__}{self._counter}"
        node._scene = self
        if not node.GetName():
            node.SetName(self.GenerateUniqueName(type(node).__name__.removeprefix("vtkMRML").removesuffix("Node")))
        self._nodes[node._id] = node
        return node

    def AddNewNodeByClass(self, className: str, name: str = "") -> vtkMRMLNode:
        node = NODE_CLASSES[className]()
        node.SetName(name)
        return self.AddNode(node)

    def RemoveNode(self, node: vtkMRMLNode) -> None:
        self._nodes.pop(node.GetID(), None)

    def GetNodeByID(self, nodeId: str):
        return self._nodes.get(nodeId)

    def GetFirstNodeByClass(self, className: str):
        return next((n for n in self._nodes.values() if n.IsA(className)), None)

    def GetNodesByClass(self, className: str) -> list[vtkMRMLNode]:
        return [n for n in self._nodes.values() if n.IsA(className)]

    def GetSingletonNode(self, tag: str, className: str):
        return next((n for n in self.GetNodesByClass(className) if n.GetSingletonTag() == tag), None)

    def GenerateUniqueName(self, baseName: str) -> str:
        names = {n.GetName() for n in self._nodes.values()}
        if baseName not in names:
            return baseName
        index = 1
        while f"{baseName}_{index}" in names:
            index += 1
        return f"{baseName}_{index}"

    def Clear(self, removeSingletons: int = 0) -> None:
        self._nodes = {i: n for i, n in self._nodes.items()
                       if not removeSingletons and isinstance(n, vtkMRMLScriptedModuleNode)}
