# A stand-in for the SlicerConfig.cmake of a Slicer 5.10 build tree, written by this project: it defines only
# what MedIL's CMakeLists use, with the signatures and install layout of Slicer's own (Slicer/Slicer CMake/:
# SlicerMacroBuildScriptedModule.cmake, SlicerMacroPythonTesting.cmake, SlicerExtensionCPack.cmake), so that a
# real `cmake` configures, installs and registers the tests of the extension here
# (Testing/test_cmake_extension.py). It builds nothing of Slicer; its launcher runs a module's self-test in
# Testing/slicer_app.py's stand-in of Slicer's application layer.
set(Slicer_FOUND TRUE)
set(Slicer_VERSION "5.10.0")
set(Slicer_VERSION_MAJOR 5)
set(Slicer_VERSION_MINOR 10)
set(Slicer_USE_PYTHONQT ON)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-${Slicer_VERSION_MAJOR}.${Slicer_VERSION_MINOR}/qt-scripted-modules")
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}")
set(Slicer_USE_FILE "${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake")
set(Slicer_EXTENSION_GENERATE_CONFIG "${CMAKE_CURRENT_LIST_DIR}/SlicerExtensionGenerateConfig.cmake")
set(Slicer_EXTENSION_CPACK "${CMAKE_CURRENT_LIST_DIR}/SlicerExtensionCPack.cmake")
find_package(Python3 REQUIRED COMPONENTS Interpreter)
set(Slicer_LAUNCHER_EXECUTABLE "${Python3_EXECUTABLE};${CMAKE_CURRENT_LIST_DIR}/SlicerLauncher.py")
