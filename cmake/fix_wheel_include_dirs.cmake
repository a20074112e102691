# lens_ros_fix_wheel_include_dirs(): a wart of the PyPI ROS wheels. Their exported
# <pkg>__rosidl_generator_py targets list the wheel builder's include dirs
# (/opt/python/cp311-cp311/include/python3.11, .../numpy/_core/include), which do not exist here,
# and cmake's generate step then fails. Replace every include dir of an imported target of the
# calling directory that does not exist with this Python's (and NumPy's) include dirs. Call it
# after the find_package() calls. On a normal ROS install every path exists and nothing changes.
# Used by CMakeLists.txt and by scripts/build_interfaces_from_wheel.sh.
function(lens_ros_fix_wheel_include_dirs)
  find_package(Python3 REQUIRED COMPONENTS Interpreter Development.Module NumPy)
  get_directory_property(_imported_targets IMPORTED_TARGETS)
  foreach(_target IN LISTS _imported_targets)
    get_target_property(_includes ${_target} INTERFACE_INCLUDE_DIRECTORIES)
    if(NOT _includes)
      continue()
    endif()
    set(_fixed "")
    set(_changed FALSE)
    foreach(_dir IN LISTS _includes)
      if(_dir MATCHES "^\\$<" OR EXISTS "${_dir}")
        list(APPEND _fixed "${_dir}")
      else()
        set(_changed TRUE)
        if(_dir MATCHES "numpy")
          list(APPEND _fixed ${Python3_NumPy_INCLUDE_DIRS})
        elseif(_dir MATCHES "python3")
          list(APPEND _fixed ${Python3_INCLUDE_DIRS})
        endif()
      endif()
    endforeach()
    if(_changed)
      list(REMOVE_DUPLICATES _fixed)
      message(STATUS "${PROJECT_NAME}: replaced non-existent include dirs of imported target ${_target}")
      set_target_properties(${_target} PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_fixed}")
    endif()
  endforeach()
endfunction()
