# Stand-in of Slicer's SlicerExtensionGenerateConfig.cmake: the real one writes <Extension>Config.cmake for extensions
# that depend on this one; nothing depends on MedIL, so the stand-in only checks the extension is named.
if(NOT DEFINED EXTENSION_NAME AND DEFINED PROJECT_NAME)
  set(EXTENSION_NAME ${PROJECT_NAME})
endif()
