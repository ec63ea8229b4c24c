from stillroom.entry_points import teacher_cache

if __name__ == "__main__":
  teacher_cache()
