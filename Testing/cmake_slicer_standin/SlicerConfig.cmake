# Stand-in for the SlicerConfig.cmake of a Slicer 5.10 build, for configuring, building and installing the
# extension where Slicer is not available (Testing/test_slicer_packaging.py). It provides the directory
# variables and the macros the extension uses, with the file-placement rules of Slicer's
# slicerMacroBuildScriptedModule and CTK's ctkMacroCompilePythonScript (copy rules, install of the
# qt-scripted-modules folder); it records what was packaged in ${CMAKE_BINARY_DIR}/standin-*.txt.
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/SlicerExtensionGenerateConfig.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/SlicerExtensionCPack.cmake)
set(Slicer_FOUND TRUE)
