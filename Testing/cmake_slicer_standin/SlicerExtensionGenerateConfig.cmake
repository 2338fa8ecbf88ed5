# Stand-in (see SlicerConfig.cmake): the extension description must be complete.
foreach(var EXTENSION_HOMEPAGE EXTENSION_CATEGORY EXTENSION_CONTRIBUTORS EXTENSION_DESCRIPTION EXTENSION_ICONURL
            EXTENSION_SCREENSHOTURLS EXTENSION_DEPENDS)
  if("${${var}}" STREQUAL "")
    message(FATAL_ERROR "${var} is not set")
  endif()
  file(APPEND ${CMAKE_BINARY_DIR}/standin-extension.txt "${var}=${${var}}\n")
endforeach()
