# Stand-in (see SlicerConfig.cmake): packaging needs the project to be the extension and a readme.
if(NOT "${EXTENSION_NAME}" STREQUAL "${PROJECT_NAME}")
  message(FATAL_ERROR "EXTENSION_NAME ${EXTENSION_NAME} differs from PROJECT_NAME ${PROJECT_NAME}")
endif()
if(NOT EXISTS "${EXTENSION_README_FILE}")
  message(FATAL_ERROR "EXTENSION_README_FILE ${EXTENSION_README_FILE} does not exist")
endif()
