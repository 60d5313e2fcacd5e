"""`holorec data`: MovieLens-1M from GroupLens (md5-checked) or from a local zip or folder."""
from __future__ import annotations

import hashlib
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from model.data import DataError, load

ML1M_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
# Published md5 of GroupLens' ml-1m.zip (the value GroupLens lists in ml-1m.zip.md5 and that
# dataset loaders such as DataRec and papers_with_code's movielens config verify against).
ML1M_MD5 = "c4d9eecfca2ab87c1945afe126590906"
ML1M_FILES = ("ratings.dat", "movies.dat", "users.dat")


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _install_zip(zip_path: Path, dest: Path, *, check_md5: bool) -> None:
    """Verify the archive (md5 when it claims to be GroupLens' ml-1m.zip, then its members) and extract."""
    if check_md5:
        got = _md5(zip_path)
        if got != ML1M_MD5:
            raise DataError(f"{zip_path}: md5 {got} does not match the published {ML1M_MD5} for ml-1m.zip")
    try:
        with zipfile.ZipFile(zip_path) as z:
            names = set(z.namelist())
            missing = [f for f in ML1M_FILES if f"ml-1m/{f}" not in names]
            if missing:
                raise DataError(f"{zip_path}: not a MovieLens-1M archive (missing ml-1m/{', ml-1m/'.join(missing)})")
            with tempfile.TemporaryDirectory() as tmp:
                for f in ML1M_FILES:
                    z.extract(f"ml-1m/{f}", tmp)
                _install_folder(Path(tmp) / "ml-1m", dest)
    except zipfile.BadZipFile as e:
        raise DataError(f"{zip_path}: not a zip archive ({e})") from e


def _install_folder(src: Path, dest: Path) -> None:
    if (src / "ml-1m" / "ratings.dat").is_file():
        src = src / "ml-1m"
    missing = [f for f in ML1M_FILES[:2] if not (src / f).is_file()]
    if missing:
        raise DataError(f"{src}: not a MovieLens-1M folder (missing {', '.join(missing)})")
    dest.mkdir(parents=True, exist_ok=True)
    for f in ML1M_FILES:
        if (src / f).is_file():
            shutil.copyfile(src / f, dest / f)
    load(str(dest))  # parse it once so a bad copy fails here, not at training time


def fetch_ml1m(dest: Path, src: str | None = None) -> None:
    """MovieLens-1M into `dest`: downloaded from GroupLens (md5-checked), or from `src`, a zip or a folder."""
    if src:
        p = Path(src)
        if p.is_dir():
            _install_folder(p, dest)
        elif p.is_file():
            _install_zip(p, dest, check_md5=p.name == "ml-1m.zip")
        else:
            raise DataError(f"{p}: no such file or directory")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            zip_path = Path(tmp) / "ml-1m.zip"
            print(f"downloading {ML1M_URL}")
            try:
                urllib.request.urlretrieve(ML1M_URL, zip_path)
            except OSError as e:
                raise DataError(f"download failed ({e}); fetch ml-1m.zip elsewhere and pass --from") from e
            _install_zip(zip_path, dest, check_md5=True)
    print(load(str(dest)).summary())
    print(f"MovieLens-1M ready in {dest}")
