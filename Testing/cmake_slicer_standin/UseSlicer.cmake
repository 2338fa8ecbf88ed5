# Stand-in for UseSlicer.cmake (see SlicerConfig.cmake).
set(Slicer_USE_PYTHONQT ON)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-5.10/qt-scripted-modules")
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}")
if(NOT DEFINED EXTENSION_NAME)
  set(EXTENSION_NAME ${PROJECT_NAME})
endif()
file(WRITE ${CMAKE_BINARY_DIR}/standin-files.txt "")
file(WRITE ${CMAKE_BINARY_DIR}/standin-tests.txt "")
file(WRITE ${CMAKE_BINARY_DIR}/standin-extension.txt "")

# CTK: copy SCRIPTS (".py" appended when missing) and RESOURCES from SOURCE_DIR (default: the current
# source folder) to DESTINATION_DIR, keeping their relative paths; an absolute script path is placed at its
# path relative to the current binary folder. DESTINATION_DIR is installed to INSTALL_DIR (its content
# with NO_INSTALL_SUBDIR, else the folder itself).
macro(ctkMacroCompilePythonScript)
  cmake_parse_arguments(MY "NO_INSTALL_SUBDIR;GLOBAL_TARGET" "TARGET_NAME;SOURCE_DIR;DESTINATION_DIR;INSTALL_DIR"
    "SCRIPTS;RESOURCES" ${ARGN})
  foreach(var TARGET_NAME SCRIPTS DESTINATION_DIR INSTALL_DIR)
    if(NOT DEFINED MY_${var})
      message(FATAL_ERROR "${var} is mandatory")
    endif()
  endforeach()
  if(NOT DEFINED MY_SOURCE_DIR)
    set(MY_SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR})
  endif()
  get_filename_component(MY_SOURCE_DIR ${MY_SOURCE_DIR} REALPATH)
  get_filename_component(MY_DESTINATION_DIR ${MY_DESTINATION_DIR} REALPATH)
  set(_copied)
  foreach(file ${MY_SCRIPTS})
    get_filename_component(ext ${file} EXT)
    if(NOT "${ext}" MATCHES "py")
      set(file "${file}.py")
    endif()
    if(IS_ABSOLUTE ${file})
      set(src ${file})
      file(RELATIVE_PATH tgt_file ${CMAKE_CURRENT_BINARY_DIR} ${file})
    else()
      set(src ${MY_SOURCE_DIR}/${file})
      set(tgt_file ${file})
    endif()
    list(APPEND _copied ${MY_DESTINATION_DIR}/${tgt_file})
    add_custom_command(OUTPUT ${MY_DESTINATION_DIR}/${tgt_file} DEPENDS ${src}
      COMMAND ${CMAKE_COMMAND} -E copy ${src} ${MY_DESTINATION_DIR}/${tgt_file})
    file(APPEND ${CMAKE_BINARY_DIR}/standin-files.txt "${MY_DESTINATION_DIR}/${tgt_file}\n")
  endforeach()
  foreach(file ${MY_RESOURCES})
    if(IS_ABSOLUTE ${file})
      set(src ${file})
    else()
      set(src ${MY_SOURCE_DIR}/${file})
    endif()
    list(APPEND _copied ${MY_DESTINATION_DIR}/${file})
    add_custom_command(OUTPUT ${MY_DESTINATION_DIR}/${file} DEPENDS ${src}
      COMMAND ${CMAKE_COMMAND} -E copy ${src} ${MY_DESTINATION_DIR}/${file})
    file(APPEND ${CMAKE_BINARY_DIR}/standin-files.txt "${MY_DESTINATION_DIR}/${file}\n")
  endforeach()
  add_custom_target(Copy${MY_TARGET_NAME}PythonFiles ALL DEPENDS ${_copied})
  if(MY_NO_INSTALL_SUBDIR)
    install(DIRECTORY "${MY_DESTINATION_DIR}/" DESTINATION "${MY_INSTALL_DIR}" USE_SOURCE_PERMISSIONS)
  else()
    install(DIRECTORY "${MY_DESTINATION_DIR}" DESTINATION "${MY_INSTALL_DIR}" USE_SOURCE_PERMISSIONS)
  endif()
endmacro()

# Slicer: every SCRIPTS / RESOURCES entry must exist relative to the current source folder (or be generated);
# they are copied into <build>/lib/Slicer-X.Y/qt-scripted-modules and installed from there.
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY_SLICER "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_SLICER_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "Unknown keywords given to slicerMacroBuildScriptedModule(): ${MY_SLICER_UNPARSED_ARGUMENTS}")
  endif()
  foreach(value ${MY_SLICER_SCRIPTS} ${MY_SLICER_RESOURCES})
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${value} AND NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${value}.py)
      message(FATAL_ERROR "slicerMacroBuildScriptedModule given nonexistent file or directory '${value}'")
    endif()
  endforeach()
  ctkMacroCompilePythonScript(
    TARGET_NAME ${MY_SLICER_NAME}
    SCRIPTS "${MY_SLICER_SCRIPTS}"
    RESOURCES "${MY_SLICER_RESOURCES}"
    DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}
    INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}
    NO_INSTALL_SUBDIR
    )
endmacro()

macro(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT;TESTNAME_PREFIX" "SLICER_ARGS" ${ARGN})
  if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${MY_SCRIPT})
    message(FATAL_ERROR "slicer_add_python_unittest: no such script ${MY_SCRIPT}")
  endif()
  file(APPEND ${CMAKE_BINARY_DIR}/standin-tests.txt "${CMAKE_CURRENT_SOURCE_DIR}/${MY_SCRIPT}\n")
endmacro()
