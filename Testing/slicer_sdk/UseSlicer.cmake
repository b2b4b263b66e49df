# Stand-in of Slicer's UseSlicer.cmake: the macros a scripted-module extension calls.
include(CTest)

# slicerMacroBuildScriptedModule(NAME n SCRIPTS ... RESOURCES ... [WITH_GENERIC_TESTS] [WITH_SUBDIR] [VERBOSE]), as Slicer's:
# every script and resource must exist; they are copied into the build tree's qt-scripted-modules folder (where
# ctest's self-test loads the module) and installed into Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR, keeping their
# relative paths (ctkMacroCompilePythonScript with NO_INSTALL_SUBDIR; the .pyc files it adds are not made here).
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY_SLICER "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_SLICER_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "Unknown keywords given to slicerMacroBuildScriptedModule(): \"${MY_SLICER_UNPARSED_ARGUMENTS}\"")
  endif()
  if(NOT DEFINED MY_SLICER_NAME)
    message(FATAL_ERROR "NAME is mandatory")
  endif()
  message(STATUS "Configuring Scripted module: ${MY_SLICER_NAME}")
  set(_subdir "")
  if(MY_SLICER_WITH_SUBDIR)
    get_filename_component(_subdir ${CMAKE_CURRENT_SOURCE_DIR} NAME)
    set(_subdir "/${_subdir}")
  endif()
  foreach(_file ${MY_SLICER_SCRIPTS} ${MY_SLICER_RESOURCES})
    set(_abs "${CMAKE_CURRENT_SOURCE_DIR}/${_file}")
    if(NOT EXISTS "${_abs}" AND EXISTS "${_abs}.py")
      set(_file "${_file}.py")
      set(_abs "${_abs}.py")
    endif()
    if(NOT EXISTS "${_abs}")
      message(FATAL_ERROR "slicerMacroBuildScriptedModule given nonexistent file or directory '${_file}'")
    endif()
    get_filename_component(_dir "${_file}" DIRECTORY)
    configure_file("${_abs}" "${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}${_subdir}/${_file}" COPYONLY)
    install(FILES "${_abs}" DESTINATION "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}${_subdir}/${_dir}" COMPONENT RuntimeLibraries)
  endforeach()
endmacro()

# slicer_add_python_unittest(SCRIPT s [TESTNAME_PREFIX p] [SLICER_ARGS ...]), as Slicer's: a ctest that starts the
# launcher and runs the script's unittest (slicer.testing.runUnitTest) from the build and source folders.
macro(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "TESTNAME_PREFIX;SCRIPT" "SLICER_ARGS" ${ARGN})
  get_filename_component(test_name ${MY_SCRIPT} NAME_WE)
  add_test(
    NAME py_${MY_TESTNAME_PREFIX}${test_name}
    COMMAND ${Slicer_LAUNCHER_EXECUTABLE}
    --no-splash --ignore-slicerrc ${MY_SLICER_ARGS}
    --python-code "import slicer.testing; slicer.testing.runUnitTest(['${CMAKE_CURRENT_BINARY_DIR}', '${CMAKE_CURRENT_SOURCE_DIR}'], '${test_name}')"
    )
endmacro()
