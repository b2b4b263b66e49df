# Stand-in of Slicer's SlicerExtensionCPack.cmake: like the real one, it refuses an extension whose metadata is missing,
# then sets up CPack to package what the install rules put in place.
if(NOT DEFINED EXTENSION_NAME)
  set(EXTENSION_NAME ${PROJECT_NAME})
endif()
foreach(var EXTENSION_HOMEPAGE EXTENSION_CATEGORY EXTENSION_CONTRIBUTORS EXTENSION_DESCRIPTION EXTENSION_ICONURL EXTENSION_SCREENSHOTURLS)
  if("${${var}}" STREQUAL "")
    message(FATAL_ERROR "Variable ${var} is not defined or empty")
  endif()
endforeach()
set(CPACK_PACKAGE_NAME "${EXTENSION_NAME}")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "${EXTENSION_DESCRIPTION}")
set(CPACK_GENERATOR "TGZ")
include(CPack)
