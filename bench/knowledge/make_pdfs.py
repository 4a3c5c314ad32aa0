"""Regenerate the benchmark corpus's PDFs with fpdf2 (core font Helvetica: latin-1 text only).

The PDFs are committed; this script documents how they were made:
`.venv/bin/python bench/knowledge/make_pdfs.py`. It writes one PDF per part and the edited version of the
part 2 PDF (same file name, three values changed) under docs/edited/.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from fpdf import FPDF

DOCS = Path(__file__).parent / "docs"

FERRY = (
    "Ebbrick Ferry Line: Service Summary 2025",
    "Ebbrick Ferry Line",
    datetime.datetime(2025, 3, 1, tzinfo=datetime.UTC),
    [
        (
            "Route and fleet",
            [
                "Ebbrick Ferry Line operates a year-round car ferry service between the mainland harbour of "
                "Pellan Quay and the island of Varrow Isle. The route is the only scheduled sea link to "
                "Varrow Isle, and sailings are cancelled only when the coastguard issues a storm warning.",
                "The flagship of Ebbrick Ferry Line is the MV Corran Lass. The MV Corran Lass was built by "
                "the Dunholt Shipyard. The MV Corran Lass can carry 340 passengers on two enclosed passenger "
                "decks. The service speed of the MV Corran Lass is 13.5 knots.",
            ],
        ),
        (
            "Timetable, fares and staff",
            [
                "The first sailing of the day leaves Pellan Quay at 06:15 on every weekday. A return ticket "
                "for a car and driver on Ebbrick Ferry Line costs $86.50 in the 2025 season.",
                "Ebbrick Ferry Line carried 212,400 passengers in 2024, which is the highest yearly total in "
                "the history of the company.",
                "The chief engineer of Ebbrick Ferry Line is Tamsin Vey. The engineering team of Ebbrick "
                "Ferry Line maintains the engines of the MV Corran Lass during the winter refit.",
            ],
        ),
    ],
)

# The part 2 PDF; EDITS maps original values to the values of the edited version.
ROBOTICS_EDITS = {"23.4 kg": "21.8 kg", "$48,200": "$51,900", "31 employees": "38 employees"}
ROBOTICS = (
    "Quenby Robotics: Company Profile",
    "Quenby Robotics",
    datetime.datetime(2025, 9, 1, tzinfo=datetime.UTC),
    [
        (
            "Company",
            [
                "Quenby Robotics was founded by Tamsin Vey, the former chief engineer of Ebbrick Ferry Line. "
                "Quenby Robotics was founded on 3 February 2022. The headquarters of Quenby Robotics is in "
                "the port town of Brindlecombe.",
                "Quenby Robotics has 31 employees. Quenby Robotics raised $2.75 million from investors in "
                "its first funding round. Quenby Robotics designs, assembles and tests every robot in its own "
                "workshop beside the harbour.",
            ],
        ),
        (
            "Product",
            [
                "The main product of Quenby Robotics is the HK-17 Limpet, a robot that cleans the hulls of "
                "ships while the ships are moored in port.",
                "The HK-17 Limpet weighs 23.4 kg without its tether. The HK-17 Limpet can clean a hull for "
                "5.5 hours on one battery charge. The list price of one HK-17 Limpet is $48,200.",
                "The first customer of Quenby Robotics was the Greyhythe Port Authority, which uses the "
                "robots on its pilot boats and tugs. Customers of Quenby Robotics receive remote software "
                "updates for the HK-17 Limpet throughout the service life of the robot.",
            ],
        ),
    ],
)

MILL = (
    "Saddlecombe Textile Mill: A Short History",
    "Saddlecombe Textile Mill",
    datetime.datetime(2026, 2, 1, tzinfo=datetime.UTC),
    [
        (
            "The building",
            [
                "The Saddlecombe Textile Mill stands on the bank of the River Hurnell. The Saddlecombe "
                "Textile Mill was built by the wool merchant Jonas Pettigrew. The water wheel of the "
                "Saddlecombe Textile Mill has a diameter of 7.3 metres and still turns on open days. The "
                "stone walls and the slate roof of the Saddlecombe Textile Mill were restored by local "
                "craftsmen during the last renovation.",
            ],
        ),
        (
            "The mill today",
            [
                "Today the Saddlecombe Textile Mill runs 58 looms. The Saddlecombe Textile Mill employs 46 "
                "weavers and finishers. The manager of the Saddlecombe Textile Mill is Delphine Aske.",
                "The best-known product of the Saddlecombe Textile Mill is the Heronwool blanket. A "
                "Heronwool blanket weighs 1.9 kg. A Heronwool blanket costs \u00a374.90 in the mill shop.",
                "The Saddlecombe Textile Mill buys its wool from the Hobb Moor Farmers' Cooperative, whose "
                "flocks graze on the moorland above the valley. Visitors to the Saddlecombe Textile Mill "
                "can watch the weavers at work from a gallery above the weaving floor.",
            ],
        ),
    ],
)


def build(doc, path: Path, edits: dict[str, str] | None = None) -> None:
    title, author, created, pages = doc
    pdf = FPDF(format="A4")
    pdf.set_title(title)
    pdf.set_author(author)
    pdf.set_creation_date(created)
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 15)
    pdf.multi_cell(0, 8, title)
    pdf.ln(4)
    for heading, paragraphs in pages:
        pdf.set_font("Helvetica", "B", 12)
        pdf.multi_cell(0, 7, heading)
        pdf.ln(2)
        pdf.set_font("Helvetica", size=11)
        for paragraph in paragraphs:
            for old, new in (edits or {}).items():
                assert paragraph.count(old) <= 1, old
                paragraph = paragraph.replace(old, new)
            pdf.multi_cell(0, 6, paragraph)
            pdf.ln(3)
    path.parent.mkdir(parents=True, exist_ok=True)
    pdf.output(str(path))


if __name__ == "__main__":
    build(FERRY, DOCS / "part1" / "ebbrick-ferry-line-2025.pdf")
    build(ROBOTICS, DOCS / "part2" / "quenby-robotics-profile.pdf")
    build(MILL, DOCS / "part3" / "saddlecombe-textile-mill.pdf")
    build(ROBOTICS, DOCS / "edited" / "quenby-robotics-profile.pdf", edits=ROBOTICS_EDITS)
