# moe.h's CMake package (installed by make install under <prefix>/share/cmake/moe):
# find_package(moe) gives the INTERFACE target moe::moe, the installed moe.h's
# include directory and libm. Relocatable: paths are relative to this file.
if(NOT TARGET moe::moe)
  get_filename_component(_moe_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
  add_library(moe::moe INTERFACE IMPORTED)
  set_target_properties(moe::moe PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${_moe_prefix}/include")
  find_library(MOE_LIBM m)
  if(MOE_LIBM)
    set_target_properties(moe::moe PROPERTIES INTERFACE_LINK_LIBRARIES m)
  endif()
  unset(_moe_prefix)
endif()
