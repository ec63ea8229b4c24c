from stillroom.entry_points import student_train

if __name__ == "__main__":
  student_train()
