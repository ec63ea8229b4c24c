"""Zarr requests issued together (one round trip to an object store instead of one each), and arrays opened so."""

import asyncio
import warnings

import zarr
from zarr.core.sync import sync as zarr_sync


def async_group(group: zarr.Group) -> zarr.AsyncGroup:
  """The group's asynchronous handle, to issue several requests at once (`gather`). (Zarr 3.1 gives arrays a
  public `async_array`, groups none: this is the one place that reads the private attribute.)"""
  return group._async_group  # pylint: disable=protected-access


def gather(coroutines: list) -> list:
  """Runs zarr coroutines together on zarr's event loop; returns their results in order, an exception in place of
  a result that failed. On an object store, requests issued together wait one round trip, not one each."""
  async def together():
    return await asyncio.gather(*coroutines, return_exceptions=True)
  return zarr_sync(together()) if coroutines else []


def raise_first_failure(results) -> None:
  """Raises the first exception among `gather`'s results (once every request has finished), if any."""
  failed = next((result for result in results if isinstance(result, BaseException)), None)
  if failed is not None:
    raise failed


def open_arrays(group: zarr.Group, names: list[str]) -> list:
  """The group's arrays `names` opened together (`gather`'s results: KeyError for one that is not there)."""
  with warnings.catch_warnings():  # zarr warns about a directory whose metadata is gone; callers report it.
    warnings.simplefilter("ignore")
    return gather([async_group(group).getitem(name) for name in names])
